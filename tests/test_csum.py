from __future__ import annotations

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vionet import csum

MAC_A = b"\x02\x00\x00\x00\x00\x01"
MAC_B = b"\x02\x00\x00\x00\x00\x02"


def ref_checksum(data: bytes) -> int:
    """RFC 1071, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build(proto: str, v6: bool, payload: bytes, vlan: bool = False) -> bytes:
    """A frame with a correct L4 checksum, computed by dpkt."""
    l4: dpkt.Packet
    if proto == "tcp":
        l4 = dpkt.tcp.TCP(sport=1234, dport=80, seq=7, flags=dpkt.tcp.TH_ACK, data=payload)
        num = dpkt.ip.IP_PROTO_TCP
    else:
        l4 = dpkt.udp.UDP(sport=5353, dport=53, data=payload)
        l4.ulen = 8 + len(payload)
        num = dpkt.ip.IP_PROTO_UDP
    ip: dpkt.Packet
    if v6:
        ip = dpkt.ip6.IP6(src=b"\xfd" + b"\0" * 14 + b"\1", dst=b"\xfd" + b"\0" * 14 + b"\2",
                          nxt=num, hlim=64, data=l4, plen=len(bytes(l4)))
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(src=b"\x0a\0\0\1", dst=b"\x0a\0\0\2", p=num, ttl=64, data=l4)
        ip.len = 20 + len(bytes(l4))
        etype = dpkt.ethernet.ETH_TYPE_IP
    raw = bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=MAC_B, type=etype, data=ip))
    if vlan:
        raw = raw[:12] + b"\x81\x00\x00\x07" + raw[12:]
    return raw


def split(data: bytes, cuts: list[int]) -> list[memoryview]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(memoryview(bytearray(data[prev:p])))
        prev = p
    return out


def joined(iov: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in iov)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_fast_sum_matches_rfc1071(data: bytes) -> None:
    assert csum.checksum(data) == (ref_checksum(data) or 0xFFFF)


def test_zero_sum_is_sent_as_ffff() -> None:
    assert csum.checksum(b"") == 0xFFFF
    assert csum.checksum(b"\xff\xff") == 0xFFFF
    assert csum.checksum(b"\x00\x01") == 0xFFFE


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [False, True])
def test_verify_dpkt_frames(proto: str, v6: bool, vlan: bool) -> None:
    frame = build(proto, v6, b"hello, world!", vlan)
    assert csum.verify(frame) is True
    bad = bytearray(frame)
    bad[-1] ^= 0x40
    assert csum.verify(bad) is False
    assert csum.verify(split(frame, [5, 17, 40])) is True


def test_verify_udp_zero_checksum() -> None:
    for v6, ok in ((False, True), (True, False)):
        frame = bytearray(build("udp", v6, b"abc"))
        start, offset = csum.l4_csum_location(bytes(frame)) or (0, 0)
        frame[start + offset : start + offset + 2] = b"\0\0"
        assert csum.verify(frame) is ok


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x02" * 14, b"\x02" * 12 + b"\x08\x06" + bytes(28),  # ARP
     build("tcp", False, b"x")[:40],  # truncated
     b"\x02" * 12 + b"\x81\x00"],  # VLAN tag cut short
)
def test_verify_ignores_what_it_cannot_parse(frame: bytes) -> None:
    assert csum.verify(frame) is None


def test_ipv4_fragments_are_not_checked() -> None:
    frame = bytearray(build("udp", False, b"abcdefgh"))
    frame[14 + 6] = 0x20  # more fragments
    assert csum.verify(frame) is None


def test_ipv6_extension_headers_are_skipped() -> None:
    frame = build("udp", True, b"payload!")
    ip = 14
    udp = frame[ip + 40 :]
    hop = bytes([17, 0]) + bytes(6)  # hop-by-hop, next = UDP, 8 bytes
    hdr = bytearray(frame[ip : ip + 40])
    hdr[6] = 0
    hdr[4:6] = (len(udp) + 8).to_bytes(2, "big")
    out = frame[:ip] + bytes(hdr) + hop + udp
    assert csum.verify(out) is True
    assert csum.l4_csum_location(out) == (ip + 48, 6)


@settings(max_examples=300, deadline=None)
@given(
    proto=st.sampled_from(["tcp", "udp"]),
    v6=st.booleans(),
    vlan=st.booleans(),
    payload=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 320), max_size=10),
    slack=st.binary(max_size=6),
)
def test_complete_equals_reference_on_random_splits(
    proto: str, v6: bool, vlan: bool, payload: bytes, cuts: list[int], slack: bytes
) -> None:
    good = build(proto, v6, payload, vlan)
    partial = bytearray(good)
    loc = csum.make_partial(partial)
    assert loc is not None
    start, offset = loc
    # Buffers larger than the frame (RX buffers usually are): the tail must not be read.
    iov = split(bytes(partial) + slack, cuts)
    assert csum.complete(iov, len(good), start, offset)
    out = joined(iov)
    assert out[len(good) :] == slack
    assert csum.verify(out[: len(good)]) is True
    # Same bytes as dpkt's checksum, except that a zero UDP sum is sent as 0xFFFF either way.
    assert out[: len(good)] == good or (
        good[start + offset : start + offset + 2] in (b"\0\0", b"\xff\xff")
        and out[start + offset : start + offset + 2] == b"\xff\xff"
    )


def test_complete_writes_across_a_boundary() -> None:
    good = build("tcp", False, b"data" * 10)
    partial = bytearray(good)
    start, offset = csum.make_partial(partial) or (0, 0)
    field = start + offset
    iov = split(bytes(partial), [field + 1])  # the checksum field straddles two buffers
    assert csum.complete(iov, len(good), start, offset)
    assert joined(iov) == good


@pytest.mark.parametrize(
    ("length", "start", "offset"),
    [(100, 90, 9), (100, 100, 0), (100, -1, 0), (100, 0, -1), (200, 34, 16)],
)
def test_complete_refuses_offsets_outside_the_frame(length: int, start: int, offset: int) -> None:
    iov = [memoryview(bytearray(60)), memoryview(bytearray(40))]
    assert not csum.complete(iov, length, start, offset)
    assert joined(iov) == bytes(100)


def test_make_partial_refuses_non_tcp_udp() -> None:
    assert csum.make_partial(bytearray(b"\x02" * 12 + b"\x08\x06" + bytes(28))) is None
