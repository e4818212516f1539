"""The control process: owns vmctl's socket, vets requests, forwards them to the parent.

Unprivileged and sandboxed like vionet. It learns each client's uid/gid with SO_PEERCRED and
overwrites whatever the client claimed; a non-root client may only make VM-scoped requests
(start, stop, status, pause, unpause, wait, console), which the parent then checks against the
VM's owner. Global requests (reload, load, reset, log) from non-root get EPERM here already.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import socket
import struct
import sys

import trio

from imsg.catalogue import CONTROL_FROM_CLIENT, CONTROL_FROM_PARENT, MsgType
from imsg.channel import ImsgSocket, TrioImsgChannel
from imsg.codec import Imsg
from imsg.errors import ImsgError
from vmd_py import sandbox

log = logging.getLogger("vmd.control")

USER_REQUESTS = frozenset({
    MsgType.CTL_START, MsgType.CTL_STOP, MsgType.CTL_STATUS, MsgType.CTL_PAUSE,
    MsgType.CTL_UNPAUSE, MsgType.CTL_WAIT, MsgType.CTL_CONSOLE,
})
_UCRED = struct.Struct("iII")
MAX_CLIENTS = 64


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class Control:
    def __init__(self, parent: TrioImsgChannel, listener: socket.socket) -> None:
        self.parent = parent
        self.listener = listener
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[Imsg]] = {}
        self.clients = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._from_parent)
            self.listener.setblocking(False)
            while True:
                await trio.lowlevel.wait_readable(self.listener)
                try:
                    conn, _ = self.listener.accept()
                except BlockingIOError:
                    continue
                if self.clients >= MAX_CLIENTS:
                    conn.close()
                    continue
                nursery.start_soon(self._client, conn)

    async def _from_parent(self) -> None:
        while True:
            try:
                msg = await self.parent.receive()
            except ImsgError as exc:
                log.warning("refused message from parent: %s", exc)
                continue
            except EOFError:
                log.info("parent went away; exiting")
                raise SystemExit(0) from None
            waiter = self._waiting.pop(msg.peerid, None)
            if waiter is not None:
                waiter.send_nowait(msg)

    async def _client(self, conn: socket.socket) -> None:
        self.clients += 1
        chan = ImsgSocket(conn, CONTROL_FROM_CLIENT)
        conn.setblocking(False)
        try:
            _pid, uid, gid = peer_cred(conn)
            while True:
                try:
                    await trio.lowlevel.wait_readable(conn)
                    msg = chan.recv()
                except BlockingIOError:
                    continue
                except ImsgError as exc:
                    # A client that sent garbage and hung up must not take the process down.
                    try:
                        chan.send_error(exc.kind.value, str(exc))
                    except OSError:
                        return
                    continue
                except (EOFError, OSError):
                    return
                reply = await self._handle(msg, uid, gid)
                try:
                    chan.send(reply)
                except OSError:
                    return
        finally:
            self.clients -= 1
            conn.close()

    async def _handle(self, msg: Imsg, uid: int, gid: int) -> Imsg:
        if uid != 0 and msg.type not in USER_REQUESTS:
            return Imsg(MsgType.CTL_RESULT, {
                "ok": False, "code": errno.EPERM,
                "message": f"{msg.type.name.removeprefix('CTL_').lower()}: permission denied",
            })
        payload = {**msg.payload, "uid": uid, "gid": gid}
        rid = next(self._ids) & 0xFFFF_FFFF or 1
        send, recv = trio.open_memory_channel[Imsg](1)
        self._waiting[rid] = send
        try:
            await self.parent.send(Imsg(msg.type, payload, peerid=rid))
            return await recv.receive()
        finally:
            self._waiting.pop(rid, None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmd-control")
    p.add_argument("--imsg-fd", type=int, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--user", default="_vmd")
    p.add_argument("--empty-root", default="/var/lib/vmd-py/empty")
    return p.parse_args(argv)


async def _amain(parent_sock: socket.socket, listener: socket.socket) -> None:
    sandbox.lock_down()
    chan = TrioImsgChannel(ImsgSocket(parent_sock, CONTROL_FROM_PARENT), role="control")
    await chan.hello()
    await Control(chan, listener).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"control[{os.getpid()}] %(levelname)s %(message)s")
    parent_sock = socket.socket(fileno=args.imsg_fd)
    listener = socket.socket(fileno=args.listen_fd)
    sandbox.drop_privileges(user=args.user, empty_root=args.empty_root)
    trio.run(_amain, parent_sock, listener)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
