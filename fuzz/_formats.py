"""Byte layouts of the fuzz inputs: parsed by the fuzzers, built by make_corpus.py.

One place per layout, so seeds and fuzzers cannot drift apart. Pure struct code: importing
this must not import the project (atheris instruments project modules on first import).
Every parser reads past the end as zero bytes, so any input is a valid case.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass


class Reader:
    """Little-endian fields from the front of the input, zero-padded past its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


# --- split buffers: a count, that many u16 piece lengths, then the bytes ------------------

MAX_PIECES = 8


def read_pieces(r: Reader) -> list[bytes]:
    """Split the rest of the input into pieces; the last piece takes what is left."""
    count = r.u8() % MAX_PIECES
    lengths = [r.u16() for _ in range(count)]
    data = r.rest()
    pieces: list[bytes] = []
    pos = 0
    for n in lengths:
        pieces.append(data[pos : pos + n])
        pos += len(pieces[-1])
    pieces.append(data[pos:])
    return pieces


def pack_pieces(pieces: Sequence[bytes]) -> bytes:
    if not pieces or len(pieces) > MAX_PIECES:
        raise ValueError(f"1..{MAX_PIECES} pieces")
    head = bytes((len(pieces) - 1,)) + b"".join(
        struct.pack("<H", len(p)) for p in pieces[:-1]
    )
    return head + b"".join(pieces)


# --- imsg: nfds u8, allow-list selector u8, the datagram ----------------------------------

# Selector k > 0 picks imsg.catalogue.<IMSG_ALLOW_LISTS[(k - 1) % len]>; 0 is no allow-list.
IMSG_ALLOW_LISTS = (
    "PARENT_FROM_VIONET",
    "VIONET_FROM_PARENT",
    "CONTROL_FROM_CLIENT",
    "PARENT_FROM_CONTROL",
    "CONTROL_FROM_PARENT",
    "CLIENT_FROM_CONTROL",
)


@dataclass(frozen=True)
class ImsgCase:
    nfds: int  # 0..3
    allowed: int  # see IMSG_ALLOW_LISTS
    datagram: bytes

    @classmethod
    def parse(cls, data: bytes) -> ImsgCase:
        r = Reader(data)
        return cls(r.u8() % 4, r.u8(), r.rest())

    def pack(self) -> bytes:
        return bytes((self.nfds, self.allowed)) + self.datagram


# --- vhost-user: mode u8 (low nibble: fds, 0x10: through a socket), then wire bytes -------

VHOST_MAX_FDS = 9
VHOST_STREAM = 0x10


@dataclass(frozen=True)
class VhostCase:
    nfds: int
    stream: bool
    wire: bytes

    @classmethod
    def parse(cls, data: bytes) -> VhostCase:
        r = Reader(data)
        mode = r.u8()
        return cls((mode & 0xF) % (VHOST_MAX_FDS + 1), bool(mode & VHOST_STREAM), r.rest())

    def pack(self) -> bytes:
        return bytes((self.nfds | (VHOST_STREAM if self.stream else 0),)) + self.wire


# --- split virtqueue: parameters, then a memory image -------------------------------------

# (gpa, size): region 1 is GPA-adjacent to region 0 (a buffer may span both), region 2 not.
RING_REGIONS = ((0x0, 0x4000), (0x4000, 0x1000), (0x10000, 0x1000))
RING_MAX_SIZE_LOG = 9  # queue sizes 1..512
RING_EVENT_IDX = 0x01
RING_INDIRECT = 0x02
RING_BY_GPA = 0x04
RING_POP_MANY = 0x08
RING_CAP = 0x10  # use the case's max_chain_bytes instead of the default
RING_BAD_SIZE = 0x20  # size is size_log + 1 raw (mostly not a power of two)
_RING = struct.Struct("<BBHHHHHHB")


@dataclass(frozen=True)
class RingCase:
    size_log: int
    flags: int
    desc: int  # GPAs of the rings
    avail: int
    used: int
    last_avail: int
    max_chain_bytes: int
    min_write: int  # pop_many
    max_chains: int
    memory: bytes  # laid over the regions in order, from each one's start

    @property
    def size(self) -> int:
        if self.flags & RING_BAD_SIZE:
            return self.size_log + 1
        return 1 << (self.size_log % (RING_MAX_SIZE_LOG + 1))

    @classmethod
    def parse(cls, data: bytes) -> RingCase:
        r = Reader(data)
        size_log, flags, desc, avail, used, last, cap, min_write, max_chains = _RING.unpack(
            r.take(_RING.size)
        )
        return cls(
            size_log, flags, desc, avail, used, last, cap, min_write, max_chains, r.rest()
        )

    def pack(self) -> bytes:
        return (
            _RING.pack(
                self.size_log, self.flags, self.desc, self.avail, self.used, self.last_avail,
                self.max_chain_bytes, self.min_write, self.max_chains,
            )
            + self.memory
        )


# --- vnet header and checksums: mode u8, then the mode's fields ---------------------------

VNET_TX, VNET_RX, VNET_GATHER, VNET_CSUM, VNET_L4 = range(5)
VNET_MODES = 5


def pack_vnet_tx(
    hdr: bytes, frame_len: int, acked: int, max_frame: int, *, as_object: bool
) -> bytes:
    """``hdr`` may be short: its length travels in the first byte (0..12, or the object)."""
    return (
        bytes((VNET_TX, len(hdr) | (0x80 if as_object else 0)))
        + hdr.ljust(12, b"\0")
        + struct.pack("<IQH", frame_len, acked, max_frame)
    )


def pack_vnet_rx(hdr: bytes, acked: int, tap_mask: int, frame: Sequence[bytes]) -> bytes:
    return (
        bytes((VNET_RX, len(hdr)))
        + hdr.ljust(12, b"\0")
        + struct.pack("<QI", acked, tap_mask)
        + pack_pieces(frame)
    )


def pack_vnet_gather(n: int, offset: int, pieces: Sequence[bytes]) -> bytes:
    return bytes((VNET_GATHER, n, offset)) + pack_pieces(pieces)


def pack_vnet_csum(
    length: int, csum_start: int, csum_offset: int, pieces: Sequence[bytes]
) -> bytes:
    """Signed 32-bit fields, so negative values are reachable too."""
    return bytes((VNET_CSUM,)) + struct.pack("<iii", length, csum_start, csum_offset) + (
        pack_pieces(pieces)
    )


def pack_vnet_l4(frame: bytes) -> bytes:
    return bytes((VNET_L4,)) + frame


# --- DHCP: fix-up flags u8, then the Ethernet frame ---------------------------------------

DHCP_FIX_LENGTHS = 0x01  # set IP total and UDP length from the frame's size
DHCP_FIX_IP_CSUM = 0x02  # recompute the IP header checksum (a wall a fuzzer rarely climbs)
DHCP_MEMORYVIEW = 0x04
DHCP_HOSTNAME = 0x08


@dataclass(frozen=True)
class DhcpCase:
    flags: int
    frame: bytes

    @classmethod
    def parse(cls, data: bytes) -> DhcpCase:
        r = Reader(data)
        return cls(r.u8(), r.rest())

    def pack(self) -> bytes:
        return bytes((self.flags,)) + self.frame
