"""Internet checksums (RFC 1071) over frames split across guest buffers.

:func:`complete` finishes a NEEDS_CSUM frame in place: the stack left the pseudo-header sum
in the checksum field; the checksum of everything from csum_start to the end of the frame goes
there instead. It reads and writes only inside the given views.

Speed trick: 2**16 == 1 (mod 0xFFFF), so the ones'-complement sum of big-endian 16-bit words
is the value of the bytes as one big integer, mod 0xFFFF; a piece that starts at an odd
offset only changes its weight by 256. No per-word Python loop, no joining of the pieces.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPPROTO_TCP = 6
IPPROTO_UDP = 17
_IPV6_EXT = (0, 43, 60)  # hop-by-hop, routing, destination options
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

_U16 = struct.Struct("!H")


def sum_mod(data: bytes | memoryview, odd_start: bool = False) -> int:
    """The ones'-complement sum of ``data`` mod 0xFFFF, as if it began at an odd offset when
    ``odd_start``."""
    value = int.from_bytes(data, "big") % 0xFFFF
    if (len(data) + odd_start) & 1:
        value = value * 256 % 0xFFFF
    return value


def finish(total: int) -> int:
    """The checksum for a sum mod 0xFFFF; never 0 (0 means "none" for UDP, and is -0 anyway)."""
    return (~total & 0xFFFF) or 0xFFFF


def checksum(data: bytes | memoryview) -> int:
    return finish(sum_mod(data))


def complete(iov: Sequence[memoryview], length: int, csum_start: int, csum_offset: int) -> bool:
    """Store the checksum of bytes ``csum_start``..``length`` of the frame ``iov`` at
    ``csum_start + csum_offset``. False (nothing written) if that does not fit in the frame."""
    field = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or field + 2 > length:
        return False
    total = 0
    pos = 0
    views: list[tuple[memoryview, int]] = []  # (piece, its frame offset) for the write
    for v in iov:
        n = len(v)
        end = pos + n
        if end > csum_start and pos < length:
            a = max(csum_start - pos, 0)
            b = min(n, length - pos)
            total += sum_mod(v[a:b], bool((pos + a - csum_start) & 1))
            if pos <= field + 1 and end > field:
                views.append((v, pos))
        pos = end
        if pos >= length:
            break
    if pos < length:
        return False
    value = finish(total % 0xFFFF)
    out = _U16.pack(value)
    for v, base in views:
        for k in (0, 1):
            off = field + k - base
            if 0 <= off < len(v):
                v[off] = out[k]
    return True


def _l4(frame: bytes) -> tuple[int, int, int, int] | None:
    """(l4 offset, protocol, pseudo-header sum mod 0xFFFF, l4 length) of an unfragmented
    TCP/UDP frame; None for anything else or anything truncated."""
    pos = 12
    if len(frame) < ETH_HLEN:
        return None
    ethertype = _U16.unpack_from(frame, pos)[0]
    while ethertype in VLAN_TPIDS:
        pos += 4
        if len(frame) < pos + 2:
            return None
        ethertype = _U16.unpack_from(frame, pos)[0]
    ip = pos + 2
    if ethertype == ETH_P_IP:
        if len(frame) < ip + 20 or frame[ip] >> 4 != 4:
            return None
        ihl = (frame[ip] & 0xF) * 4
        total_len = _U16.unpack_from(frame, ip + 2)[0]
        frag = _U16.unpack_from(frame, ip + 6)[0]
        if ihl < 20 or frag & 0x3FFF or total_len < ihl or len(frame) < ip + total_len:
            return None
        proto = frame[ip + 9]
        l4len = total_len - ihl
        pseudo = frame[ip + 12 : ip + 20] + bytes((0, proto)) + _U16.pack(l4len)
        return ip + ihl, proto, sum_mod(pseudo), l4len
    if ethertype == ETH_P_IPV6:
        if len(frame) < ip + 40 or frame[ip] >> 4 != 6:
            return None
        payload_len = _U16.unpack_from(frame, ip + 4)[0]
        end = ip + 40 + payload_len
        if len(frame) < end:
            return None
        proto = frame[ip + 6]
        off = ip + 40
        while proto in _IPV6_EXT:
            if end < off + 8:
                return None
            proto, ext_len = frame[off], (frame[off + 1] + 1) * 8
            off += ext_len
        if off > end:
            return None
        l4len = end - off
        pseudo = frame[ip + 8 : ip + 40] + l4len.to_bytes(4, "big") + bytes((0, 0, 0, proto))
        return off, proto, sum_mod(pseudo), l4len
    return None


def l4_csum_location(frame: bytes) -> tuple[int, int] | None:
    """(csum_start, csum_offset) of a TCP/UDP frame, as a stack would put in the header."""
    info = _l4(frame)
    if info is None or info[1] not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    return info[0], TCP_CSUM_OFFSET if info[1] == IPPROTO_TCP else UDP_CSUM_OFFSET


def make_partial(frame: bytearray) -> tuple[int, int] | None:
    """Turn a TCP/UDP frame into what a NEEDS_CSUM sender hands over: the pseudo-header sum
    (not complemented) in the checksum field. Returns (csum_start, csum_offset)."""
    info = _l4(bytes(frame))
    if info is None or info[1] not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    start, proto, pseudo, l4len = info
    offset = TCP_CSUM_OFFSET if proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    if l4len < offset + 2:
        return None
    frame[start + offset : start + offset + 2] = _U16.pack(pseudo or 0xFFFF)
    return start, offset


def verify(frame: bytes | bytearray | memoryview | Sequence[memoryview]) -> bool | None:
    """Whether the TCP/UDP checksum (with pseudo-header) is right; None if not TCP/UDP.

    A UDP checksum of 0 over IPv4 means "none" and counts as right.
    """
    if isinstance(frame, bytes | bytearray | memoryview):
        data = bytes(frame)
    else:
        data = b"".join(bytes(v) for v in frame)
    info = _l4(data)
    if info is None or info[1] not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    start, proto, pseudo, l4len = info
    offset = TCP_CSUM_OFFSET if proto == IPPROTO_TCP else UDP_CSUM_OFFSET
    if l4len < offset + 2:
        return False
    stored = _U16.unpack_from(data, start + offset)[0]
    if proto == IPPROTO_UDP and stored == 0:
        return _outer_is_v4(data)
    total = (pseudo + sum_mod(data[start : start + l4len])) % 0xFFFF
    return total == 0


def _outer_is_v4(frame: bytes) -> bool:
    pos = 12
    ethertype = _U16.unpack_from(frame, pos)[0]
    while ethertype in VLAN_TPIDS:
        pos += 4
        ethertype = _U16.unpack_from(frame, pos)[0]
    return bool(ethertype == ETH_P_IP)
