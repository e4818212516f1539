"""Sockets carrying imsgs: a bounded, fd-safe receive, and a trio wrapper.

Every receive sizes its buffers one byte / a few fds beyond the limit, so an oversized datagram or
an fd flood is *seen* (MSG_TRUNC / extra fds) and refused rather than silently cut to fit. Any fd
that arrives with a refused message is closed before the error propagates.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import select
import socket

import trio

from imsg.catalogue import PROTOCOL_VERSION, MsgType
from imsg.codec import Imsg, decode, encode, error_payload
from imsg.errors import ImsgError, ImsgErrorKind
from imsg.header import MAX_IMSG_SIZE

DEFAULT_MAX_FDS = 4
# Room for this many fds in the control buffer: more than any type carries, so a flood up to it is
# counted as TOO_MANY_FDS; beyond it the kernel sets MSG_CTRUNC and closes the rest itself.
_FD_SLACK = 32


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ImsgSocket:
    """One end of a SOCK_SEQPACKET imsg channel (blocking or non-blocking, as the socket is)."""

    def __init__(
        self,
        sock: socket.socket,
        allowed: frozenset[MsgType],
        *,
        max_size: int = MAX_IMSG_SIZE,
        max_fds: int = DEFAULT_MAX_FDS,
        peerid: int = 0,
    ) -> None:
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("imsg channels are SOCK_SEQPACKET")
        self.sock = sock
        self.allowed = allowed
        self.max_size = max_size
        self.max_fds = max_fds
        self.peerid = peerid
        self.errors: collections.Counter[str] = collections.Counter()
        self.received = 0
        self.sent = 0
        self._pid = os.getpid()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: Imsg) -> None:
        if not msg.pid:
            msg.pid = self._pid
        if not msg.peerid:
            msg.peerid = self.peerid
        data = encode(msg, self.max_size)
        if msg.fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", msg.fds).tobytes())]
            self.sock.sendmsg([data], anc)
        else:
            self.sock.send(data)
        self.sent += 1

    def send_error(self, code: str, detail: str, request: int = 0) -> None:
        self.send(Imsg(MsgType.ERROR, dict(error_payload(code, detail, request))))

    def _peer_hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in poller.poll(0))

    def recv(self) -> Imsg:
        """Receive one message. Raises EOFError when the peer is gone, ImsgError when refused,
        BlockingIOError when a non-blocking socket has nothing."""
        ancsize = socket.CMSG_SPACE((self.max_fds + _FD_SLACK) * 4)
        data, anc, flags, _ = self.sock.recvmsg(
            self.max_size + 1, ancsize, socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        foreign_control = False
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
            else:
                foreign_control = True
        try:
            if not data and not fds and self._peer_hung_up():
                raise EOFError("peer closed the imsg channel")
            if flags & socket.MSG_CTRUNC:
                raise ImsgError(ImsgErrorKind.CTRUNC, "control data truncated")
            if foreign_control:
                raise ImsgError(ImsgErrorKind.BAD_CONTROL, "non-SCM_RIGHTS control message")
            if flags & socket.MSG_TRUNC or len(data) > self.max_size:
                raise ImsgError(ImsgErrorKind.OVERSIZED, f"> {self.max_size} bytes")
            if len(fds) > self.max_fds:
                raise ImsgError(ImsgErrorKind.TOO_MANY_FDS, f"{len(fds)} > {self.max_fds}")
            msg = decode(data, len(fds), self.allowed, self.max_size)
        except ImsgError as exc:
            _close_all(fds)
            self.errors[exc.kind.value] += 1
            raise
        except BaseException:
            _close_all(fds)
            raise
        msg.fds = fds
        self.received += 1
        return msg


class TrioImsgChannel:
    """An :class:`ImsgSocket` driven by trio: waits on readiness, never blocks the loop.

    The first message each way is HELLO with the protocol version; :meth:`receive` refuses
    anything before it (SEQUENCE) and any later HELLO.
    """

    def __init__(self, imsock: ImsgSocket, role: str) -> None:
        self.imsock = imsock
        self.role = role
        self.peer_role: str | None = None
        imsock.sock.setblocking(False)
        self._send_lock = trio.Lock()

    @property
    def errors(self) -> collections.Counter[str]:
        return self.imsock.errors

    async def send(self, msg: Imsg) -> None:
        async with self._send_lock:
            while True:
                try:
                    self.imsock.send(msg)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.imsock.sock)

    async def send_error(self, code: str, detail: str, request: int = 0) -> None:
        await self.send(Imsg(MsgType.ERROR, dict(error_payload(code, detail, request))))

    async def _recv_raw(self) -> Imsg:
        while True:
            try:
                return self.imsock.recv()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.imsock.sock)

    def _refuse(self, kind: ImsgErrorKind, detail: str, msg: Imsg) -> ImsgError:
        _close_all(msg.fds)
        self.imsock.errors[kind.value] += 1
        return ImsgError(kind, detail)

    async def hello(self) -> str:
        """Send our HELLO and wait for the peer's; returns the peer's role."""
        await self.send(Imsg(MsgType.HELLO, {"version": PROTOCOL_VERSION, "role": self.role}))
        msg = await self._recv_raw()
        if msg.type is not MsgType.HELLO:
            raise self._refuse(ImsgErrorKind.SEQUENCE, f"{msg.type.name} before HELLO", msg)
        if msg.payload["version"] != PROTOCOL_VERSION:
            raise self._refuse(
                ImsgErrorKind.VERSION, f"version {msg.payload['version']}", msg
            )
        self.peer_role = str(msg.payload["role"])
        return self.peer_role

    async def receive(self) -> Imsg:
        """Next message after the handshake. EOFError at hang-up; ImsgError if refused."""
        msg = await self._recv_raw()
        if self.peer_role is None:
            raise self._refuse(ImsgErrorKind.SEQUENCE, f"{msg.type.name} before HELLO", msg)
        if msg.type is MsgType.HELLO:
            raise self._refuse(ImsgErrorKind.SEQUENCE, "second HELLO", msg)
        return msg

    def close(self) -> None:
        self.imsock.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A close-on-exec SOCK_SEQPACKET pair; the parent marks the child's end inheritable."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
