"""vhost-user message codec, back-end side (QEMU docs/interop/vhost-user.rst).

A message is a 12-byte header (request u32, flags u32, size u32, native byte order) and
``size`` bytes of payload on a SOCK_STREAM unix socket; descriptors ride in SCM_RIGHTS on
the same ``sendmsg`` as the header. The decoder accepts only the requests a vhost-user-net
back-end needs, each with exactly its payload size and descriptor count; everything else
raises :class:`VhostUserError` after closing every descriptor that arrived with it.

A frame whose header claims more than :data:`MAX_PAYLOAD` bytes cannot be skipped safely,
so that error is ``fatal`` (the stream is out of step). Any other error leaves the stream at
the next message boundary.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
import struct
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import trio

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
# Larger than any payload we accept, small enough to read and throw away in one go.
MAX_PAYLOAD = 4096
MAX_REGIONS = 8
# Room for a few more fds than any request carries, so an excess is seen (and closed)
# rather than silently truncated by the kernel.
_FD_ROOM = MAX_REGIONS + 8

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_MEM_HEAD = struct.Struct("=II")
_REGION = struct.Struct("=QQQQ")


class Request(enum.IntEnum):
    """Front-end request types (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class Reason(enum.Enum):
    """Why a message was refused; the value is the counter key."""

    TRUNCATED = "truncated"  # the peer closed the stream inside a message
    OVERSIZED = "oversized"  # header size > MAX_PAYLOAD: fatal, the stream is out of step
    BAD_FLAGS = "bad_flags"  # wrong version, reply bit on a request, unknown bits
    UNKNOWN_REQUEST = "unknown_request"
    UNSUPPORTED = "unsupported"  # a known request this back-end does not implement
    BAD_SIZE = "bad_size"  # payload size differs from the request's payload
    BAD_FDS = "bad_fds"  # descriptor count differs from what the request carries
    CTRUNC = "ctrunc"  # the kernel dropped descriptors
    BAD_CONTROL = "bad_control"  # ancillary data other than SCM_RIGHTS
    BAD_PAYLOAD = "bad_payload"  # a field out of its range (reserved bits, nregions)
    BAD_INDEX = "bad_index"  # vring index >= the device's queue count
    BAD_NUM = "bad_num"  # vring size / base / enable value out of range
    BAD_FEATURES = "bad_features"  # feature bits we did not offer
    BAD_PROTOCOL_FEATURES = "bad_protocol_features"
    NOT_NEGOTIATED = "not_negotiated"  # a request whose feature was not offered
    BAD_MEM_TABLE = "bad_mem_table"  # overlapping/empty/oversized regions, short fd
    MMAP_FAILED = "mmap_failed"
    UNMAPPED = "unmapped"  # ring not inside the memory table, or misaligned
    RING_BUSY = "ring_busy"  # NUM/BASE on a running ring
    NO_POLLING = "no_polling"  # SET_VRING_KICK without an fd: polling is not offered


class VhostUserError(Exception):
    """A refused message; every descriptor it carried is already closed.

    ``request``/``flags`` are set when the header was readable, so a caller can still
    answer a NEED_REPLY; ``fatal`` means the stream can no longer be parsed.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str = "",
        *,
        request: int | None = None,
        flags: int | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.request = request
        self.flags = flags
        self.fatal = fatal


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*HEADER.unpack(data))


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def pack(self) -> bytes:
        return _STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*_STATE.unpack(data))


@dataclass(frozen=True)
class VringAddr:
    """Ring addresses in the front-end's virtual address space (no IOMMU)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def pack(self) -> bytes:
        return _ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*_ADDR.unpack(data))


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemRegion, ...]

    def pack(self) -> bytes:
        body = b"".join(
            _REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in self.regions
        )
        return _MEM_HEAD.pack(len(self.regions), 0) + body


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: ring index and whether an fd came with it."""

    index: int
    nofd: bool

    def pack(self) -> bytes:
        return _U64.pack(self.index | (VRING_NOFD if self.nofd else 0))


Payload = None | int | VringState | VringAddr | MemTable | VringFile


class _Kind(enum.Enum):
    NONE = enum.auto()
    U64 = enum.auto()
    STATE = enum.auto()
    ADDR = enum.auto()
    MEM = enum.auto()
    FILE = enum.auto()


# The requests a vhost-user-net back-end takes. Any other known request is UNSUPPORTED.
REQUEST_PAYLOAD: dict[Request, _Kind] = {
    Request.GET_FEATURES: _Kind.NONE,
    Request.SET_FEATURES: _Kind.U64,
    Request.SET_OWNER: _Kind.NONE,
    Request.RESET_OWNER: _Kind.NONE,
    Request.SET_MEM_TABLE: _Kind.MEM,
    Request.SET_VRING_NUM: _Kind.STATE,
    Request.SET_VRING_ADDR: _Kind.ADDR,
    Request.SET_VRING_BASE: _Kind.STATE,
    Request.GET_VRING_BASE: _Kind.STATE,
    Request.SET_VRING_KICK: _Kind.FILE,
    Request.SET_VRING_CALL: _Kind.FILE,
    Request.SET_VRING_ERR: _Kind.FILE,
    Request.GET_PROTOCOL_FEATURES: _Kind.NONE,
    Request.SET_PROTOCOL_FEATURES: _Kind.U64,
    Request.GET_QUEUE_NUM: _Kind.NONE,
    Request.SET_VRING_ENABLE: _Kind.STATE,
    Request.SEND_RARP: _Kind.U64,
    Request.RESET_DEVICE: _Kind.NONE,
}

# Requests whose reply carries a body whatever REPLY_ACK says (vhost-user.rst "Communication").
EXPLICIT_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
    }
)

_FIXED_SIZE = {
    _Kind.NONE: 0,
    _Kind.U64: _U64.size,
    _Kind.STATE: _STATE.size,
    _Kind.ADDR: _ADDR.size,
    _Kind.FILE: _U64.size,
}


@dataclass
class Frame:
    """One raw message off the wire: header, payload bytes, and the fds that came with it."""

    header: Header
    payload: bytes
    fds: list[int]


@dataclass
class Message:
    """A validated request. The receiver owns ``fds`` and must close them."""

    request: Request
    flags: int
    payload: Payload
    fds: list[int]

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _refuse(frame: Frame, reason: Reason, detail: str) -> VhostUserError:
    close_fds(frame.fds)
    frame.fds.clear()
    return VhostUserError(
        reason, detail, request=frame.header.request, flags=frame.header.flags
    )


def _decode_payload(frame: Frame, req: Request, kind: _Kind) -> Payload:
    data = frame.payload
    nfds = len(frame.fds)
    if kind is _Kind.MEM:
        if len(data) < _MEM_HEAD.size:
            raise _refuse(frame, Reason.BAD_SIZE, f"{req.name}: {len(data)} bytes")
        nregions, _padding = _MEM_HEAD.unpack_from(data)
        if not 1 <= nregions <= MAX_REGIONS:
            raise _refuse(frame, Reason.BAD_PAYLOAD, f"{req.name}: {nregions} regions")
        if len(data) != _MEM_HEAD.size + nregions * _REGION.size:
            raise _refuse(frame, Reason.BAD_SIZE, f"{req.name}: {len(data)} bytes")
        if nfds != nregions:
            raise _refuse(frame, Reason.BAD_FDS, f"{req.name}: {nfds} fds, {nregions} regions")
        regions = tuple(
            MemRegion(*_REGION.unpack_from(data, _MEM_HEAD.size + i * _REGION.size))
            for i in range(nregions)
        )
        return MemTable(regions)
    if len(data) != _FIXED_SIZE[kind]:
        raise _refuse(frame, Reason.BAD_SIZE, f"{req.name}: {len(data)} bytes")
    if kind is _Kind.FILE:
        (value,) = _U64.unpack(data)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise _refuse(frame, Reason.BAD_PAYLOAD, f"{req.name}: {value:#x}")
        nofd = bool(value & VRING_NOFD)
        if nfds != (0 if nofd else 1):
            raise _refuse(frame, Reason.BAD_FDS, f"{req.name}: {nfds} fds, nofd={nofd}")
        return VringFile(value & VRING_INDEX_MASK, nofd)
    if nfds:
        raise _refuse(frame, Reason.BAD_FDS, f"{req.name}: {nfds} fds")
    if kind is _Kind.NONE:
        return None
    if kind is _Kind.U64:
        return int(_U64.unpack(data)[0])
    if kind is _Kind.STATE:
        return VringState.unpack(data)
    return VringAddr.unpack(data)


def decode_request(frame: Frame) -> Message:
    """Validate a frame as a front-end request. Raises only VhostUserError (fds closed)."""
    hdr = frame.header
    if hdr.flags & ~KNOWN_FLAGS or hdr.flags & VERSION_MASK != VERSION or hdr.flags & FLAG_REPLY:
        raise _refuse(frame, Reason.BAD_FLAGS, f"{hdr.flags:#x}")
    try:
        req = Request(hdr.request)
    except ValueError:
        raise _refuse(frame, Reason.UNKNOWN_REQUEST, str(hdr.request)) from None
    kind = REQUEST_PAYLOAD.get(req)
    if kind is None:
        raise _refuse(frame, Reason.UNSUPPORTED, req.name)
    payload = _decode_payload(frame, req, kind)
    return Message(req, hdr.flags, payload, frame.fds)


def pack_payload(payload: Payload) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, int):
        return _U64.pack(payload)
    return payload.pack()


def encode(request: int, payload: Payload = None, *, flags: int = VERSION) -> bytes:
    body = pack_payload(payload)
    return Header(request, flags, len(body)).pack() + body


def encode_reply(request: Request, payload: Payload) -> bytes:
    return encode(request, payload, flags=VERSION | FLAG_REPLY)


def unpack_u64(data: bytes) -> int:
    if len(data) != _U64.size:
        raise ValueError(f"u64 payload of {len(data)} bytes")
    return int(_U64.unpack(data)[0])


# --- receiving -------------------------------------------------------------------------

_ANC_SIZE = socket.CMSG_SPACE(_FD_ROOM * 4)
_INT_SIZE = 4


class _Recv:
    """Accumulates one frame over as many recvmsg calls as the stream needs."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.problem: tuple[Reason, str] | None = None

    def take(self, sock: socket.socket, want: int) -> bytes:
        data, anc, msg_flags, _ = sock.recvmsg(want, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
        for level, ctype, cdata in anc:
            n = len(cdata) // _INT_SIZE
            fds = list(struct.unpack(f"={n}i", cdata[: n * _INT_SIZE])) if n else []
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                self.fds.extend(fds)
            elif self.problem is None:
                self.problem = (Reason.BAD_CONTROL, f"cmsg {level}/{ctype}")
        if msg_flags & socket.MSG_CTRUNC and self.problem is None:
            self.problem = (Reason.CTRUNC, "descriptors dropped")
        return data


def _recv_steps(sock: socket.socket) -> Generator[None, None, Frame]:
    """Read one frame; yields whenever the socket would block."""
    rx = _Recv()
    buf = bytearray()
    try:
        while len(buf) < HEADER_SIZE:
            try:
                chunk = rx.take(sock, HEADER_SIZE - len(buf))
            except BlockingIOError:
                yield
                continue
            if not chunk:
                if not buf and not rx.fds:
                    raise EOFError("vhost-user peer closed the connection")
                raise VhostUserError(Reason.TRUNCATED, f"{len(buf)} header bytes", fatal=True)
            buf += chunk
        hdr = Header.unpack(bytes(buf))
        if hdr.size > MAX_PAYLOAD:
            raise VhostUserError(
                Reason.OVERSIZED, f"{hdr.size} bytes", request=hdr.request, flags=hdr.flags,
                fatal=True,
            )
        body = bytearray()
        while len(body) < hdr.size:
            try:
                chunk = rx.take(sock, hdr.size - len(body))
            except BlockingIOError:
                yield
                continue
            if not chunk:
                raise VhostUserError(
                    Reason.TRUNCATED, f"{len(body)}/{hdr.size} payload bytes",
                    request=hdr.request, flags=hdr.flags, fatal=True,
                )
            body += chunk
    except BaseException:
        close_fds(rx.fds)
        raise
    frame = Frame(hdr, bytes(body), rx.fds)
    if rx.problem is not None:
        raise _refuse(frame, *rx.problem)
    if len(frame.fds) > MAX_REGIONS:
        raise _refuse(frame, Reason.BAD_FDS, f"{len(frame.fds)} fds")
    return frame


def recv_frame(sock: socket.socket) -> Frame:
    """Blocking read of one frame. EOFError at a clean end of stream."""
    steps = _recv_steps(sock)
    try:
        while True:
            next(steps)
            select.select([sock], [], [])
    except StopIteration as done:
        frame: Frame = done.value
        return frame


async def arecv_frame(sock: socket.socket) -> Frame:
    """Like :func:`recv_frame` for a non-blocking socket under trio."""
    steps = _recv_steps(sock)
    try:
        while True:
            next(steps)
            await trio.lowlevel.wait_readable(sock)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    finally:
        steps.close()


def recv_request(sock: socket.socket) -> Message:
    return decode_request(recv_frame(sock))


async def arecv_request(sock: socket.socket) -> Message:
    return decode_request(await arecv_frame(sock))


# --- sending ---------------------------------------------------------------------------


def _send_steps(
    sock: socket.socket, data: bytes, fds: Sequence[int]
) -> Generator[None, None, None]:
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
    first = bool(fds)
    while view:
        try:
            sent = sock.sendmsg([view], anc) if first else sock.send(view)
        except BlockingIOError:
            yield
            continue
        first = False
        view = view[sent:]


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Blocking send of one encoded message; ``fds`` go with its first byte."""
    steps = _send_steps(sock, data, fds)
    for _ in steps:
        select.select([], [sock], [])


async def asend_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    steps = _send_steps(sock, data, fds)
    for _ in steps:
        await trio.lowlevel.wait_writable(sock)
