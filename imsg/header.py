"""The fixed imsg header, modelled on OpenBSD's ``struct imsg_hdr``.

``type`` u32, ``len`` u16 (header included), ``flags`` u16, ``peerid`` u32, ``pid`` u32;
little-endian on the wire so a capture reads the same on every host.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("<IHHII")
HEADER_SIZE = HEADER.size  # 16
assert HEADER_SIZE == 16

# OpenBSD's MAX_IMSGSIZE; len is a u16 anyway.
MAX_IMSG_SIZE = 16384

FLAG_HASFD = 0x0001  # as IMSGF_HASFD: the datagram carries SCM_RIGHTS
KNOWN_FLAGS = FLAG_HASFD


@dataclass(frozen=True, slots=True)
class Header:
    type: int
    length: int
    flags: int
    peerid: int
    pid: int

    def pack(self) -> bytes:
        return HEADER.pack(self.type, self.length, self.flags, self.peerid, self.pid)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        return cls(*HEADER.unpack_from(data, 0))
