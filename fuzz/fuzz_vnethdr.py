"""Fuzz virtio-net header handling and software checksums: validate_tx, validate_rx_from_tap,
gather/skip/scatter on arbitrary splits, csum.complete on arbitrary iovecs, and the csum
frame parsers. Only HeaderError may escape (and only for short headers or buffers); verdicts
keep their documented invariants; csum.complete writes exactly its two checksum bytes (or
nothing) and never outside its iovecs."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
from _formats import (
    VNET_CSUM,
    VNET_GATHER,
    VNET_L4,
    VNET_MODES,
    VNET_RX,
    VNET_TX,
    Reader,
    read_pieces,
)
from _fuzzlib import check

with atheris.instrument_imports(include=["vionet.vnethdr", "vionet.csum"]):
    from vionet import csum
    from vionet.vnethdr import (
        ETH_HLEN,
        MAX_GSO_FRAME,
        DropReason,
        HeaderError,
        RxAction,
        VnetHdr,
        gather,
        scatter,
        skip,
        validate_rx_from_tap,
        validate_tx,
    )

from vmd_py.virtio_defs import NetF, VnetGso, VnetHdrFlags

_NEEDS_CSUM = int(VnetHdrFlags.NEEDS_CSUM)
_DATA_VALID = int(VnetHdrFlags.DATA_VALID)
_ECN = int(VnetGso.ECN)
GUARD = b"\xa5" * 8


def _header(r: Reader) -> tuple[int, bool, bytes]:
    spec = r.u8()
    return (spec & 0x7F) % 13, bool(spec & 0x80), r.take(12)


def _fits(h: VnetHdr, frame_len: int) -> bool:
    return h.csum_start + h.csum_offset + 2 <= frame_len


def _tx(r: Reader) -> None:
    n, as_object, raw = _header(r)
    frame_len, acked, max_frame = r.u32(), r.u64(), r.u16()
    hdr: bytes | VnetHdr = VnetHdr.unpack(raw) if as_object else raw[:n]
    try:
        res = validate_tx(hdr, frame_len, acked, max_frame)
    except HeaderError:
        check(not as_object and n < 12, "HeaderError on a whole header")
        return
    check(as_object or n == 12, f"validate_tx took a {n}-byte header")
    if isinstance(res, DropReason):
        return
    check(frame_len >= ETH_HLEN, "runt accepted")
    check(res.num_buffers == 0 and res.flags in (0, _NEEDS_CSUM), f"tx header {res}")
    if res.flags:
        check(bool(acked & NetF.CSUM) and _fits(res, frame_len), f"tx csum {res}")
    else:
        check((res.csum_start, res.csum_offset) == (0, 0), f"stale csum fields {res}")
    if res.gso_type & ~_ECN:
        check(res.flags == _NEEDS_CSUM and 0 < res.gso_size <= frame_len, f"tx gso {res}")
        check(res.hdr_len <= frame_len <= MAX_GSO_FRAME, f"tx gso lengths {res}")
    else:
        check(res.gso_type == 0 and frame_len <= max_frame, f"tx plain {res} of {frame_len}")
        check((res.hdr_len, res.gso_size) == (0, 0), f"stale gso fields {res}")


def _views(pieces: Sequence[bytes]) -> tuple[bytearray, list[memoryview]]:
    """The pieces in one buffer, fenced by guard bytes; a view of each piece."""
    backing = bytearray(GUARD)
    spans: list[tuple[int, int]] = []
    for p in pieces:
        spans.append((len(backing), len(p)))
        backing += p + GUARD
    whole = memoryview(backing)
    return backing, [whole[off : off + n] for off, n in spans]


def _rebuild(pieces: Sequence[bytes], frame: bytes) -> bytes:
    """The backing buffer _views would make for ``frame`` cut like ``pieces``."""
    out = bytearray(GUARD)
    pos = 0
    for p in pieces:
        out += frame[pos : pos + len(p)] + GUARD
        pos += len(p)
    return bytes(out)


def _rx(r: Reader) -> None:
    n, as_object, raw = _header(r)
    acked, tap_mask = r.u64(), r.u32()
    pieces = read_pieces(r)
    backing, views = _views(pieces)
    hdr: bytes | VnetHdr = VnetHdr.unpack(raw) if as_object else raw[:n]
    try:
        v = validate_rx_from_tap(hdr, views, acked, tap_mask)
    except HeaderError:
        check(not as_object and n < 12, "HeaderError on a whole header")
        return
    check(as_object or n == 12, f"validate_rx_from_tap took a {n}-byte header")
    frame_len = sum(len(p) for p in pieces)
    h = VnetHdr.unpack(raw)
    if v.action in (RxAction.DROP, RxAction.SEGMENT):
        check(v.drop is not None, f"{v.action} without a reason")
        return
    check(v.drop is None and frame_len >= ETH_HLEN, f"delivered {v}")
    check(v.hdr.num_buffers == 0, "num_buffers set")
    check(v.hdr.flags & ~(_NEEDS_CSUM | _DATA_VALID) == 0, f"rx flags {v.hdr}")
    if not acked & NetF.GUEST_CSUM:
        check(v.hdr == VnetHdr(), f"rx header {v.hdr} for a guest without GUEST_CSUM")
    if v.hdr.flags & _NEEDS_CSUM:
        check(_fits(v.hdr, frame_len), f"rx csum offsets {v.hdr} of {frame_len}")
    if v.action is RxAction.SOFT_CSUM:
        check(bool(h.flags & _NEEDS_CSUM), "SOFT_CSUM without NEEDS_CSUM")
        done = csum.complete(views, frame_len, h.csum_start, h.csum_offset)
        check(done, f"SOFT_CSUM verdict but complete() refused {h}")
        check(backing[: len(GUARD)] == GUARD and backing.endswith(GUARD), "guards")


def _gather(r: Reader) -> None:
    n, offset = r.u8(), r.u8()
    pieces = read_pieces(r)
    joined = b"".join(pieces)
    backing, views = _views(pieces)
    try:
        got = gather(views, n)
    except HeaderError:
        check(len(joined) < n, f"gather({n}) refused {len(joined)} bytes")
    else:
        check(got == joined[:n] and len(joined) >= n, f"gather({n})")
    rest = skip(views, offset)
    check(b"".join(bytes(v) for v in rest) == joined[offset:], f"skip({offset})")
    check(all(len(v) for v in rest), "skip left an empty view")
    data = bytes(range(n % 17))
    try:
        scatter(views, offset, data)
    except HeaderError:
        check(offset + len(data) > len(joined), "scatter refused a fitting write")
        return
    check(offset + len(data) <= len(joined) or not data, "scatter wrote past the buffers")
    want = bytearray(joined)
    want[offset : offset + len(data)] = data
    check(bytes(backing) == _rebuild(pieces, bytes(want[: len(joined)])), "scatter")


def _ref_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: 16-bit words with end-around carry."""
    if len(data) & 1:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def _csum(r: Reader) -> None:
    length, start, offset = struct.unpack("<iii", r.take(12))
    pieces = read_pieces(r)
    frame = b"".join(pieces)
    backing, views = _views(pieces)
    before = bytes(backing)
    done = csum.complete(views, length, start, offset)
    field = start + offset
    fits = start >= 0 and offset >= 0 and field + 2 <= length <= len(frame)
    check(done == fits, f"complete()={done} for len {length} start {start} off {offset}")
    if not done:
        check(bytes(backing) == before, "complete() wrote although it refused")
        return
    want = bytearray(frame)
    want[field : field + 2] = _ref_checksum(frame[start:length]).to_bytes(2, "big")
    check(bytes(backing) == _rebuild(pieces, bytes(want)), "complete() wrote wrong bytes")


def _l4(r: Reader) -> None:
    frame = r.rest()
    loc = csum.l4_csum_location(frame)
    buf = bytearray(frame)
    partial = csum.make_partial(buf)
    ok = csum.verify(frame)
    check(ok is None or isinstance(ok, bool), "verify() type")
    check(csum.verify([memoryview(frame)]) == ok, "verify() differs for an iovec")
    if partial is not None:
        check(loc == partial, "make_partial and l4_csum_location disagree")
        start, off = partial
        check(csum.complete([memoryview(buf)], len(buf), start, off), "complete() refused")


_MODES = {VNET_TX: _tx, VNET_RX: _rx, VNET_GATHER: _gather, VNET_CSUM: _csum, VNET_L4: _l4}


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    _MODES[r.u8() % VNET_MODES](r)


if __name__ == "__main__":
    _fuzzlib.main("vnethdr", test_one_input, max_len=8192)
