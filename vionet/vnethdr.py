"""virtio_net_hdr (virtio 1.2, 5.1.6): gathering across iovecs, validation, normalisation.

The 12-byte header, little endian under VERSION_1 (and the tap's TUNSETVNETLE):
flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16,
num_buffers u16.

Policy choices (documented and tested):
- TX, NEEDS_CSUM set by a guest that did not negotiate CSUM: the frame is dropped and counted
  as ``needs_csum_not_negotiated``. The spec says such a driver MUST send flags 0; guessing its
  intent (computing the checksum for it) would hide the bug and accept frames a conforming
  device could not.
- TX: DATA_VALID, RSC_INFO and unknown flag bits are cleared (receive-only or unknown); the
  csum fields are zeroed unless NEEDS_CSUM, the gso fields unless a GSO type; num_buffers is 0.
- RX from the tap: a partial checksum for a guest without GUEST_CSUM is completed in software
  (csum.py); a GSO frame for a guest without the matching GUEST_* feature would need software
  segmentation, which is not implemented: the verdict is SEGMENT with a drop reason, and the
  caller drops and counts it. The tap mask normally prevents both (TUNSETOFFLOAD follows the
  guest's features); they happen in the window while the parent applies a new mask.
- num_buffers to the guest: the number of buffers used with MRG_RXBUF, else 1 (spec 5.1.6.4:
  the device MUST set it to 1 when MRG_RXBUF is not negotiated; the tap leaves it 0).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmd_py.virtio_defs import VNET_HDR_LEN, NetF, TunF, VnetGso, VnetHdrFlags

_HDR = struct.Struct("<BBHHHHH")
_HDR_U16 = struct.Struct("<H")
ETH_HLEN = 14
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8)
MAX_PLAIN_FRAME = 1514 + 4  # MTU 1500 Ethernet frame with one VLAN tag
MAX_GSO_FRAME = 65535 + ETH_HLEN + 4 * 2  # a 64 KiB IP packet with two VLAN tags
_KNOWN_GSO = frozenset(int(g) for g in VnetGso if g is not VnetGso.ECN)


class HeaderError(Exception):
    """Fewer than 12 header bytes in the buffers."""


class DropReason(enum.StrEnum):
    """Why a frame is dropped; the value is the counter name suffix."""

    NEEDS_CSUM_NOT_NEGOTIATED = "needs_csum_not_negotiated"
    BAD_CSUM_OFFSETS = "bad_csum_offsets"
    UNKNOWN_GSO = "unknown_gso"
    GSO_NOT_NEGOTIATED = "gso_not_negotiated"
    ECN_NOT_NEGOTIATED = "ecn_not_negotiated"
    ECN_WITHOUT_GSO = "ecn_without_gso"
    GSO_WITHOUT_CSUM = "gso_without_csum"
    BAD_GSO_SIZE = "bad_gso_size"
    BAD_HDR_LEN = "bad_hdr_len"
    RUNT = "runt"
    TOO_BIG = "too_big"
    RX_GSO_UNSUPPORTED = "rx_gso_unsupported"


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VnetHdr:
        if len(data) < VNET_HDR_LEN:
            raise HeaderError(f"{len(data)} header bytes")
        return cls(*_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return _HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        )


def gather(iov: Sequence[memoryview | bytes], n: int = VNET_HDR_LEN) -> bytes:
    """The first ``n`` bytes of ``iov``, however the driver split them."""
    first = iov[0] if iov else b""
    if len(first) >= n:
        return bytes(first[:n])
    parts: list[bytes] = []
    need = n
    for v in iov:
        take = min(need, len(v))
        parts.append(bytes(v[:take]))
        need -= take
        if need == 0:
            return b"".join(parts)
    raise HeaderError(f"{n - need} of {n} header bytes")


def skip(iov: Sequence[memoryview], n: int) -> list[memoryview]:
    """``iov`` without its first ``n`` bytes (views, no copy); empty views are left out."""
    out: list[memoryview] = []
    for k, v in enumerate(iov):
        if n < len(v):
            out.append(v[n:] if n else v)
            out.extend(w for w in iov[k + 1 :] if len(w))
            return out
        n -= len(v)
    return out


def scatter(iov: Sequence[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at byte ``offset`` of ``iov``, across buffer boundaries."""
    pos = 0
    for v in iov:
        end = pos + len(v)
        if offset < end:
            take = min(len(data), end - offset)
            start = offset - pos
            v[start : start + take] = data[:take]
            data = data[take:]
            offset += take
            if not data:
                return
        pos = end
    if data:
        raise HeaderError(f"{len(data)} bytes beyond the buffers")


def write_flags(iov: Sequence[memoryview], flags: int) -> None:
    scatter(iov, 0, bytes((flags,)))


def write_num_buffers(iov: Sequence[memoryview], num_buffers: int) -> None:
    scatter(iov, 10, _HDR_U16.pack(num_buffers))


# Plain ints: IntFlag arithmetic goes through the enum machinery, too slow per packet.
_NEEDS_CSUM = int(VnetHdrFlags.NEEDS_CSUM)
_ECN = int(VnetGso.ECN)
_F_CSUM = int(NetF.CSUM)
_F_HOST_ECN = int(NetF.HOST_ECN)
_F_GUEST_CSUM = int(NetF.GUEST_CSUM)
_DATA_VALID = int(VnetHdrFlags.DATA_VALID)
_GSO_FEATURE = {
    int(VnetGso.TCPV4): int(NetF.HOST_TSO4),
    int(VnetGso.TCPV6): int(NetF.HOST_TSO6),
    int(VnetGso.UDP): int(NetF.HOST_UFO),
    int(VnetGso.UDP_L4): int(NetF.HOST_USO),
}
PLAIN = VnetHdr()  # the verdict for a frame with nothing to do (callers may test identity)


def validate_tx(
    hdr: bytes | memoryview | VnetHdr,
    frame_len: int,
    acked: int,
    max_frame: int = MAX_PLAIN_FRAME,
    *,
    max_gso_frame: int = MAX_GSO_FRAME,
) -> VnetHdr | DropReason:
    """Check a guest's TX header against its acked features; the header for the tap, or why
    the frame must be dropped. ``frame_len`` counts the Ethernet frame after the header."""
    if isinstance(hdr, VnetHdr):
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = (
            hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset
        )
    else:
        if len(hdr) < VNET_HDR_LEN:
            raise HeaderError(f"{len(hdr)} header bytes")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack_from(hdr)
    needs_csum = flags & _NEEDS_CSUM
    gso = gso_type & ~_ECN
    ecn = gso_type & _ECN
    if frame_len < ETH_HLEN:
        return DropReason.RUNT
    if needs_csum:
        if not acked & _F_CSUM:
            return DropReason.NEEDS_CSUM_NOT_NEGOTIATED
        if csum_start + csum_offset + 2 > frame_len:
            return DropReason.BAD_CSUM_OFFSETS
    if gso == 0:
        if ecn:
            return DropReason.ECN_WITHOUT_GSO
        if frame_len > max_frame:
            return DropReason.TOO_BIG
        if not needs_csum:
            return PLAIN
        return VnetHdr(_NEEDS_CSUM, 0, 0, 0, csum_start, csum_offset)
    feature = _GSO_FEATURE.get(gso)
    if feature is None:
        return DropReason.UNKNOWN_GSO
    if not acked & feature:
        return DropReason.GSO_NOT_NEGOTIATED
    if ecn and not acked & _F_HOST_ECN:
        return DropReason.ECN_NOT_NEGOTIATED
    if not needs_csum:
        return DropReason.GSO_WITHOUT_CSUM
    if gso_size == 0 or gso_size > frame_len:
        return DropReason.BAD_GSO_SIZE
    if hdr_len > frame_len:
        return DropReason.BAD_HDR_LEN
    if frame_len > max_gso_frame:
        return DropReason.TOO_BIG
    return VnetHdr(_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def for_tap(hdr: VnetHdr) -> bytes:
    """The header bytes to write to the tap (same layout; num_buffers 0, the tap ignores it)."""
    if hdr.num_buffers:
        hdr = VnetHdr(
            hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset
        )
    return hdr.pack()


def for_guest(hdr: VnetHdr, num_buffers: int) -> bytes:
    """The header bytes for the guest's RX buffer."""
    return _HDR.pack(
        hdr.flags,
        hdr.gso_type,
        hdr.hdr_len,
        hdr.gso_size,
        hdr.csum_start,
        hdr.csum_offset,
        num_buffers,
    )


def num_buffers_for(acked: int, used: int) -> int:
    return used if acked & NetF.MRG_RXBUF else 1


class RxAction(enum.Enum):
    DELIVER = "deliver"  # give the guest the frame with ``RxVerdict.hdr``
    SOFT_CSUM = "soft_csum"  # complete the checksum in software first (csum.complete)
    SEGMENT = "segment"  # needs software segmentation: not implemented, drop and count
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class RxVerdict:
    action: RxAction
    hdr: VnetHdr  # the header the guest gets (num_buffers still to set)
    drop: DropReason | None = None
    beyond_tap_mask: bool = False  # the tap used an offload we had not (or no longer) enabled


_RX_GSO_TUNF = {
    VnetGso.TCPV4: int(TunF.TSO4),
    VnetGso.TCPV6: int(TunF.TSO6),
    VnetGso.UDP: int(TunF.UFO),
}


def _is_ipv6(frame: Sequence[memoryview | bytes]) -> bool | None:
    try:
        head = gather(frame, ETH_HLEN + 8)
    except HeaderError:
        return None
    pos = 12
    ethertype = int.from_bytes(head[pos : pos + 2], "big")
    while ethertype in _VLAN_TPIDS and pos + 6 <= len(head):
        pos += 4
        ethertype = int.from_bytes(head[pos : pos + 2], "big")
    return ethertype == ETH_P_IPV6


def validate_rx_from_tap(
    hdr: bytes | memoryview | VnetHdr,
    frame: Sequence[memoryview | bytes],
    acked: int,
    tap_mask: int,
) -> RxVerdict:
    """Decide what to do with a frame the tap read for the guest (``frame`` after the header)."""
    h = hdr if isinstance(hdr, VnetHdr) else VnetHdr.unpack(hdr)
    frame_len = sum(len(v) for v in frame)
    if frame_len < ETH_HLEN:
        return RxVerdict(RxAction.DROP, VnetHdr(), DropReason.RUNT)
    needs_csum = bool(h.flags & _NEEDS_CSUM)
    gso = h.gso_type & ~_ECN
    ecn = h.gso_type & _ECN
    beyond = False
    if needs_csum:
        beyond = not tap_mask & int(TunF.CSUM)
        if h.csum_start + h.csum_offset + 2 > frame_len:
            return RxVerdict(RxAction.DROP, VnetHdr(), DropReason.BAD_CSUM_OFFSETS, beyond)
    if gso:
        if gso not in _KNOWN_GSO:
            return RxVerdict(RxAction.DROP, VnetHdr(), DropReason.UNKNOWN_GSO, True)
        if gso == VnetGso.UDP_L4:
            v6 = _is_ipv6(frame)
            need = NetF.GUEST_USO6 if v6 else NetF.GUEST_USO4
            bit = int(TunF.USO6 if v6 else TunF.USO4)
        else:
            need = {
                VnetGso.TCPV4: NetF.GUEST_TSO4,
                VnetGso.TCPV6: NetF.GUEST_TSO6,
                VnetGso.UDP: NetF.GUEST_UFO,
            }[VnetGso(gso)]
            bit = _RX_GSO_TUNF[VnetGso(gso)]
        beyond = beyond or not tap_mask & bit or bool(ecn and not tap_mask & int(TunF.TSO_ECN))
        ok = bool(acked & need and acked & _F_GUEST_CSUM)
        if ecn and not acked & NetF.GUEST_ECN:
            ok = False
        if not ok or not needs_csum or h.gso_size == 0:
            return RxVerdict(RxAction.SEGMENT, VnetHdr(), DropReason.RX_GSO_UNSUPPORTED, beyond)
        return RxVerdict(
            RxAction.DELIVER,
            VnetHdr(
                flags=_NEEDS_CSUM,
                gso_type=h.gso_type,
                hdr_len=h.hdr_len,
                gso_size=h.gso_size,
                csum_start=h.csum_start,
                csum_offset=h.csum_offset,
            ),
            None,
            beyond,
        )
    if ecn:
        return RxVerdict(RxAction.DROP, VnetHdr(), DropReason.ECN_WITHOUT_GSO, True)
    if not acked & _F_GUEST_CSUM:
        # Spec 5.1.6.4.1: without GUEST_CSUM the device sets flags to zero.
        action = RxAction.SOFT_CSUM if needs_csum else RxAction.DELIVER
        return RxVerdict(action, VnetHdr(), None, beyond)
    if needs_csum:
        return RxVerdict(
            RxAction.DELIVER,
            VnetHdr(
                flags=_NEEDS_CSUM,
                csum_start=h.csum_start,
                csum_offset=h.csum_offset,
            ),
            None,
            beyond,
        )
    return RxVerdict(RxAction.DELIVER, VnetHdr(flags=h.flags & _DATA_VALID))
