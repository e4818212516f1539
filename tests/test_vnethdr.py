from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vionet import vnethdr
from vionet.vnethdr import DropReason, RxAction, VnetHdr, validate_rx_from_tap, validate_tx
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF, VnetGso, VnetHdrFlags

NC = VnetHdrFlags.NEEDS_CSUM
ALL_HOST = int(
    NetF.CSUM | NetF.HOST_TSO4 | NetF.HOST_TSO6 | NetF.HOST_UFO | NetF.HOST_USO | NetF.HOST_ECN
    | NetF.VERSION_1
)
ALL_GUEST = int(
    NetF.GUEST_CSUM | NetF.GUEST_TSO4 | NetF.GUEST_TSO6 | NetF.GUEST_UFO | NetF.GUEST_USO4
    | NetF.GUEST_USO6 | NetF.GUEST_ECN | NetF.VERSION_1
)
TCP_GSO = VnetHdr(NC, VnetGso.TCPV4, 54, 1448, 34, 16)


def split(data: bytes, cuts: list[int]) -> list[memoryview]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(memoryview(bytearray(data[prev:p])))
        prev = p
    return out


# -- layout, gather, skip, scatter -----------------------------------------------------------


def test_pack_unpack_little_endian() -> None:
    h = VnetHdr(1, 4, 0x0102, 0x0304, 0x0506, 0x0708, 0x090A)
    raw = h.pack()
    assert raw == bytes([1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0xA, 9])
    assert len(raw) == VNET_HDR_LEN
    assert VnetHdr.unpack(raw) == h


def test_gather_across_descriptors() -> None:
    raw = bytes(range(12))
    iov = [memoryview(raw[:1]), memoryview(b""), memoryview(raw[1:5]), memoryview(raw[5:] + b"xx")]
    assert vnethdr.gather(iov) == raw


@pytest.mark.parametrize("parts", [[], [b""], [b"12345"], [b"123456", b"78901"]])
def test_gather_refuses_short_headers(parts: list[bytes]) -> None:
    with pytest.raises(vnethdr.HeaderError):
        vnethdr.gather([memoryview(p) for p in parts])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=12, max_size=80), cuts=st.lists(st.integers(0, 80), max_size=14))
def test_gather_on_random_splits_equals_the_unsplit_header(data: bytes, cuts: list[int]) -> None:
    iov = split(data, cuts)
    assert vnethdr.gather(iov) == data[:12]
    rest = vnethdr.skip(iov, 12)
    assert b"".join(bytes(v) for v in rest) == data[12:]
    assert all(len(v) for v in rest)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=12, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       nb=st.integers(0, 0xFFFF), flags=st.integers(0, 255))
def test_header_writes_straddle_buffers(data: bytes, cuts: list[int], nb: int, flags: int) -> None:
    iov = split(data, cuts)
    vnethdr.write_num_buffers(iov, nb)
    vnethdr.write_flags(iov, flags)
    out = b"".join(bytes(v) for v in iov)
    assert out[10:12] == nb.to_bytes(2, "little") and out[0] == flags
    assert out[1:10] == data[1:10] and out[12:] == data[12:]


def test_scatter_refuses_to_write_past_the_buffers() -> None:
    with pytest.raises(vnethdr.HeaderError):
        vnethdr.write_num_buffers([memoryview(bytearray(11))], 1)


# -- TX validation, rule by rule ---------------------------------------------------------------


def test_plain_frame_passes_with_a_clean_header() -> None:
    h = VnetHdr(0, 0, 99, 77, 5, 6, 3)
    assert validate_tx(h.pack(), 60, 0) == VnetHdr()


def test_needs_csum_without_csum_negotiated_is_dropped() -> None:
    h = VnetHdr(NC, 0, 0, 0, 34, 16)
    assert validate_tx(h, 100, int(NetF.VERSION_1)) is DropReason.NEEDS_CSUM_NOT_NEGOTIATED
    assert validate_tx(h, 100, int(NetF.CSUM)) == VnetHdr(NC, 0, 0, 0, 34, 16)


@pytest.mark.parametrize(("start", "offset", "ok"), [(34, 16, True), (98, 0, True),
                                                      (34, 65, False), (99, 0, False),
                                                      (0xFFFF, 0xFFFF, False), (0, 7, True)])
def test_csum_offsets_must_fit_in_the_frame(start: int, offset: int, ok: bool) -> None:
    verdict = validate_tx(VnetHdr(NC, 0, 0, 0, start, offset), 100, ALL_HOST)
    assert (verdict == VnetHdr(NC, 0, 0, 0, start, offset)) if ok else (
        verdict is DropReason.BAD_CSUM_OFFSETS
    )


@pytest.mark.parametrize(
    ("gso", "feature"),
    [(VnetGso.TCPV4, NetF.HOST_TSO4), (VnetGso.TCPV6, NetF.HOST_TSO6),
     (VnetGso.UDP, NetF.HOST_UFO), (VnetGso.UDP_L4, NetF.HOST_USO)],
)
def test_gso_needs_its_host_feature(gso: VnetGso, feature: NetF) -> None:
    h = VnetHdr(NC, gso, 54, 1000, 34, 16)
    assert validate_tx(h, 3000, ALL_HOST & ~feature) is DropReason.GSO_NOT_NEGOTIATED
    assert validate_tx(h, 3000, int(NetF.CSUM | feature)) == h


@pytest.mark.parametrize("gso", [2, 6, 0x7F])
def test_unknown_gso_types(gso: int) -> None:
    assert validate_tx(VnetHdr(NC, gso, 0, 1000, 34, 16), 3000, ALL_HOST) is DropReason.UNKNOWN_GSO


def test_ecn_needs_host_ecn_and_a_gso_type() -> None:
    h = VnetHdr(NC, VnetGso.TCPV4 | VnetGso.ECN, 54, 1000, 34, 16)
    assert validate_tx(h, 3000, ALL_HOST & ~NetF.HOST_ECN) is DropReason.ECN_NOT_NEGOTIATED
    assert validate_tx(h, 3000, ALL_HOST) == h
    plain = VnetHdr(0, VnetGso.ECN)
    assert validate_tx(plain, 100, ALL_HOST) is DropReason.ECN_WITHOUT_GSO


def test_gso_requires_needs_csum() -> None:
    h = VnetHdr(0, VnetGso.TCPV4, 54, 1000, 34, 16)
    assert validate_tx(h, 3000, ALL_HOST) is DropReason.GSO_WITHOUT_CSUM


@pytest.mark.parametrize(("size", "ok"), [(0, False), (1, True), (3000, True), (3001, False)])
def test_gso_size(size: int, ok: bool) -> None:
    h = VnetHdr(NC, VnetGso.TCPV4, 54, size, 34, 16)
    assert (validate_tx(h, 3000, ALL_HOST) == h) if ok else (
        validate_tx(h, 3000, ALL_HOST) is DropReason.BAD_GSO_SIZE
    )


def test_gso_hdr_len_must_fit() -> None:
    h = VnetHdr(NC, VnetGso.TCPV4, 3001, 1000, 34, 16)
    assert validate_tx(h, 3000, ALL_HOST) is DropReason.BAD_HDR_LEN


@pytest.mark.parametrize(("length", "verdict"), [(13, DropReason.RUNT), (14, None),
                                                  (1518, None), (1519, DropReason.TOO_BIG)])
def test_plain_frame_length(length: int, verdict: DropReason | None) -> None:
    got = validate_tx(VnetHdr(), length, ALL_HOST)
    assert got is verdict if verdict else got == VnetHdr()


def test_gso_frame_length_and_configurable_limits() -> None:
    h = VnetHdr(NC, VnetGso.TCPV4, 54, 1448, 34, 16)
    assert validate_tx(h, vnethdr.MAX_GSO_FRAME, ALL_HOST) == h
    assert validate_tx(h, vnethdr.MAX_GSO_FRAME + 1, ALL_HOST) is DropReason.TOO_BIG
    assert validate_tx(h, 5000, ALL_HOST, max_gso_frame=4999) is DropReason.TOO_BIG
    assert validate_tx(VnetHdr(), 9000, ALL_HOST, 9014) == VnetHdr()


def test_receive_only_and_unknown_flags_are_cleared() -> None:
    h = VnetHdr(0xFE, 0, 0, 0, 34, 16, 9)
    assert validate_tx(h, 100, ALL_HOST) == VnetHdr()
    h = VnetHdr(0xFF, 0, 0, 0, 34, 16, 9)
    assert validate_tx(h, 100, ALL_HOST) == VnetHdr(NC, 0, 0, 0, 34, 16)


def test_for_tap_zeroes_num_buffers() -> None:
    out = vnethdr.for_tap(VnetHdr(NC, 1, 54, 1448, 34, 16, 5))
    assert out == VnetHdr(NC, 1, 54, 1448, 34, 16, 0).pack()


def test_drop_reasons_are_counter_names() -> None:
    assert f"tx_drop_{DropReason.BAD_GSO_SIZE}" == "tx_drop_bad_gso_size"
    assert all(r.value.isidentifier() for r in DropReason)


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(min_size=12, max_size=12), frame_len=st.integers(0, 70000),
       acked=st.integers(0, (1 << 64) - 1))
def test_tx_verdict_is_always_safe_for_the_tap(raw: bytes, frame_len: int, acked: int) -> None:
    v = validate_tx(raw, frame_len, acked)
    if isinstance(v, DropReason):
        return
    assert 14 <= frame_len <= vnethdr.MAX_GSO_FRAME
    assert v.flags in (0, NC) and v.num_buffers == 0
    if v.flags:
        assert acked & NetF.CSUM and v.csum_start + v.csum_offset + 2 <= frame_len
    gso = v.gso_type & ~VnetGso.ECN
    if gso:
        assert v.flags == NC and 0 < v.gso_size <= frame_len and v.hdr_len <= frame_len
    else:
        assert v.gso_type == 0 and frame_len <= vnethdr.MAX_PLAIN_FRAME


# -- RX decisions ------------------------------------------------------------------------------


def frame(ethertype: int = 0x0800, vlan: bool = False, n: int = 100) -> list[memoryview]:
    tag = b"\x81\x00\x00\x05" if vlan else b""
    data = b"\x02" * 12 + tag + ethertype.to_bytes(2, "big") + bytes(n)
    return [memoryview(bytearray(data))]


def test_rx_plain_frame_without_guest_csum_gets_flags_zero() -> None:
    v = validate_rx_from_tap(VnetHdr(VnetHdrFlags.DATA_VALID), frame(), 0, 0)
    assert v.action is RxAction.DELIVER and v.hdr == VnetHdr()


def test_rx_data_valid_passes_to_a_guest_with_guest_csum() -> None:
    v = validate_rx_from_tap(VnetHdr(VnetHdrFlags.DATA_VALID), frame(), ALL_GUEST, 1)
    assert v.action is RxAction.DELIVER and v.hdr == VnetHdr(VnetHdrFlags.DATA_VALID)


def test_rx_partial_checksum_for_a_guest_without_guest_csum_is_completed_in_software() -> None:
    v = validate_rx_from_tap(VnetHdr(NC, 0, 0, 0, 34, 16), frame(), int(NetF.VERSION_1), 0)
    assert v.action is RxAction.SOFT_CSUM and v.hdr == VnetHdr() and v.beyond_tap_mask


def test_rx_partial_checksum_for_a_guest_with_guest_csum_passes() -> None:
    v = validate_rx_from_tap(VnetHdr(NC, 0, 0, 0, 34, 16), frame(), ALL_GUEST, 1)
    assert v.action is RxAction.DELIVER and v.hdr == VnetHdr(NC, 0, 0, 0, 34, 16)
    assert not v.beyond_tap_mask


def test_rx_bad_csum_offsets_are_dropped() -> None:
    v = validate_rx_from_tap(VnetHdr(NC, 0, 0, 0, 100, 16), frame(), ALL_GUEST, 1)
    assert v.action is RxAction.DROP and v.drop is DropReason.BAD_CSUM_OFFSETS


def test_rx_runt() -> None:
    v = validate_rx_from_tap(VnetHdr(), [memoryview(b"x" * 13)], ALL_GUEST, 1)
    assert v.drop is DropReason.RUNT


@pytest.mark.parametrize(
    ("gso", "ethertype", "feature"),
    [(VnetGso.TCPV4, 0x0800, NetF.GUEST_TSO4), (VnetGso.TCPV6, 0x86DD, NetF.GUEST_TSO6),
     (VnetGso.UDP, 0x0800, NetF.GUEST_UFO), (VnetGso.UDP_L4, 0x0800, NetF.GUEST_USO4),
     (VnetGso.UDP_L4, 0x86DD, NetF.GUEST_USO6)],
)
def test_rx_gso_needs_the_guest_feature_else_segmentation(
    gso: VnetGso, ethertype: int, feature: NetF
) -> None:
    h = VnetHdr(NC, gso, 54, 1400, 34, 16)
    v = validate_rx_from_tap(h, frame(ethertype, vlan=True), ALL_GUEST, 0x7F)
    assert v.action is RxAction.DELIVER and v.hdr == h and not v.beyond_tap_mask
    v = validate_rx_from_tap(h, frame(ethertype, vlan=True), ALL_GUEST & ~feature, 0)
    assert v.action is RxAction.SEGMENT and v.drop is DropReason.RX_GSO_UNSUPPORTED
    assert v.beyond_tap_mask
    v = validate_rx_from_tap(h, frame(ethertype), int(feature), 0x7F)  # no GUEST_CSUM
    assert v.action is RxAction.SEGMENT


def test_rx_gso_ecn_needs_guest_ecn() -> None:
    h = VnetHdr(NC, VnetGso.TCPV4 | VnetGso.ECN, 54, 1400, 34, 16)
    assert validate_rx_from_tap(h, frame(), ALL_GUEST, 0x7F).action is RxAction.DELIVER
    v = validate_rx_from_tap(h, frame(), ALL_GUEST & ~NetF.GUEST_ECN, 0x7F)
    assert v.action is RxAction.SEGMENT


def test_rx_unknown_gso_is_dropped() -> None:
    v = validate_rx_from_tap(VnetHdr(NC, 2, 54, 1400, 34, 16), frame(), ALL_GUEST, 0x7F)
    assert v.action is RxAction.DROP and v.drop is DropReason.UNKNOWN_GSO


def test_num_buffers_is_one_without_mrg_rxbuf() -> None:
    assert vnethdr.num_buffers_for(int(NetF.VERSION_1), 3) == 1
    assert vnethdr.num_buffers_for(int(NetF.VERSION_1 | NetF.MRG_RXBUF), 3) == 3
    assert vnethdr.for_guest(VnetHdr(NC, 0, 0, 0, 34, 16), 1)[10:] == b"\x01\x00"


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(min_size=12, max_size=12), acked=st.integers(0, (1 << 64) - 1),
       mask=st.integers(0, 0x7F), n=st.integers(0, 200))
def test_rx_guest_never_gets_what_it_did_not_negotiate(
    raw: bytes, acked: int, mask: int, n: int
) -> None:
    v = validate_rx_from_tap(raw, frame(n=n), acked, mask)
    if v.action is not RxAction.DELIVER:
        return
    if not acked & NetF.GUEST_CSUM:
        assert v.hdr == VnetHdr()
    if v.hdr.flags & NC:
        assert acked & NetF.GUEST_CSUM
    assert v.hdr.flags & ~(NC | VnetHdrFlags.DATA_VALID) == 0
    if v.hdr.gso_type:
        gso = v.hdr.gso_type & ~VnetGso.ECN
        need = {1: NetF.GUEST_TSO4, 4: NetF.GUEST_TSO6, 3: NetF.GUEST_UFO, 5: NetF.GUEST_USO4}
        assert acked & need[gso]
        if v.hdr.gso_type & VnetGso.ECN:
            assert acked & NetF.GUEST_ECN
