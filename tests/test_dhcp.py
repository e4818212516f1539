"""vionet's DHCP responder for local interfaces, on frames built with dpkt."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parent.local import LocalAddressError, allocate
from vionet import csum, dhcp
from vionet.counters import Counters
from vionet.dhcp import DhcpResponder, LocalLink
from vionet.worker import local_link, parse_args

GUEST_MAC = bytes.fromhex("fee1bad00100")
OTHER_MAC = bytes.fromhex("020000000099")
BCAST_MAC = b"\xff" * 6
GUEST_IP = IPv4Address("100.64.1.3")
HOST_IP = IPv4Address("100.64.1.2")
LINK = LocalLink(guest=GUEST_IP, host=HOST_IP)
XID = 0x1234ABCD


def dhcp_opts(msg_type: int | None,
              extra: Sequence[tuple[int, bytes]] = ()) -> list[tuple[int, bytes]]:
    opts = [] if msg_type is None else [(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes((msg_type,)))]
    return opts + list(extra)


def request_frame(
    msg_type: int | None = dpkt.dhcp.DHCPDISCOVER,
    *,
    extra: Sequence[tuple[int, bytes]] = (),
    op: int = dpkt.dhcp.DHCP_OP_REQUEST,
    chaddr: bytes = GUEST_MAC,
    src_mac: bytes = GUEST_MAC,
    dst_mac: bytes = BCAST_MAC,
    src_ip: bytes = b"\0\0\0\0",
    dst_ip: bytes = b"\xff\xff\xff\xff",
    ciaddr: int = 0,
    flags: int = 0,
    magic: int = dpkt.dhcp.DHCP_MAGIC,
    options_raw: bytes | None = None,
) -> bytes:
    msg = dpkt.dhcp.DHCP(op=op, chaddr=chaddr, xid=XID, ciaddr=ciaddr, flags=flags, magic=magic,
                         opts=dhcp_opts(msg_type, extra))
    payload = bytes(msg)
    if options_raw is not None:
        payload = payload[:240] + options_raw
    udp = dpkt.udp.UDP(sport=68, dport=67, data=payload)
    udp.ulen = 8 + len(payload)
    ip = dpkt.ip.IP(src=src_ip, dst=dst_ip, p=dpkt.ip.IP_PROTO_UDP, ttl=64, data=udp)
    ip.len = 20 + udp.ulen
    return bytes(dpkt.ethernet.Ethernet(src=src_mac, dst=dst_mac, type=0x0800, data=ip))


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def responder(counters: Counters) -> DhcpResponder:
    return DhcpResponder(GUEST_MAC, LINK, counters, hostname="guest1")


def parse_reply(frame: bytes) -> tuple[dpkt.ethernet.Ethernet, dpkt.ip.IP, dpkt.dhcp.DHCP,
                                         dict[int, bytes]]:
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP)
    udp = ip.data
    assert isinstance(udp, dpkt.udp.UDP)
    assert (udp.sport, udp.dport) == (67, 68)
    assert ip.len == len(frame) - 14 and udp.ulen == ip.len - 20
    # Checksums a receiver (busybox udhcpc checks both) verifies.
    assert csum.sum_mod(frame[14:34]) == 0
    pseudo = bytes(ip.src) + bytes(ip.dst) + struct.pack("!BBH", 0, 17, udp.ulen)
    assert csum.sum_mod(pseudo + frame[34:]) == 0
    msg = dpkt.dhcp.DHCP(bytes(udp.data))
    assert len(bytes(udp.data)) >= dhcp.BOOTP_MIN_LEN
    return eth, ip, msg, dict(msg.opts)


def test_discover_gets_offer(responder: DhcpResponder, counters: Counters) -> None:
    reply = responder.answer(request_frame())
    assert reply is not None
    eth, ip, msg, opts = parse_reply(reply)
    assert eth.dst == GUEST_MAC and eth.src != GUEST_MAC and not eth.src[0] & 1
    assert ip.src == HOST_IP.packed and ip.dst == GUEST_IP.packed
    assert msg.op == dpkt.dhcp.DHCP_OP_REPLY and msg.xid == XID and msg.chaddr[:6] == GUEST_MAC
    assert msg.yiaddr == int(GUEST_IP) and msg.ciaddr == 0
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((dpkt.dhcp.DHCPOFFER,))
    assert opts[dpkt.dhcp.DHCP_OPT_SERVER_ID] == HOST_IP.packed
    assert opts[dpkt.dhcp.DHCP_OPT_ROUTER] == HOST_IP.packed
    assert opts[dpkt.dhcp.DHCP_OPT_NETMASK] == bytes((255, 255, 255, 254))
    assert struct.unpack("!I", opts[dpkt.dhcp.DHCP_OPT_LEASE_SEC])[0] == dhcp.LEASE_SECONDS
    assert opts[dpkt.dhcp.DHCP_OPT_HOSTNAME] == b"guest1"
    assert counters["dhcp_offers"] == 1 and counters["dhcp_requests"] == 1


def test_request_gets_ack(responder: DhcpResponder, counters: Counters) -> None:
    frame = request_frame(dpkt.dhcp.DHCPREQUEST, extra=[
        (dpkt.dhcp.DHCP_OPT_REQ_IP, GUEST_IP.packed),
        (dpkt.dhcp.DHCP_OPT_SERVER_ID, HOST_IP.packed),
    ])
    reply = responder.answer(frame)
    assert reply is not None
    _, _, msg, opts = parse_reply(reply)
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((dpkt.dhcp.DHCPACK,))
    assert msg.yiaddr == int(GUEST_IP)
    assert counters["dhcp_acks"] == 1


def test_renewal_from_bound_client(responder: DhcpResponder) -> None:
    """RENEWING: unicast to the server, ciaddr set, no requested-address option."""
    frame = request_frame(dpkt.dhcp.DHCPREQUEST, src_ip=GUEST_IP.packed, dst_ip=HOST_IP.packed,
                          dst_mac=OTHER_MAC, ciaddr=int(GUEST_IP))
    reply = responder.answer(frame)
    assert reply is not None
    _, _, msg, opts = parse_reply(reply)
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((dpkt.dhcp.DHCPACK,))
    assert msg.ciaddr == int(GUEST_IP)


def test_request_for_other_address_gets_nak(responder: DhcpResponder,
                                            counters: Counters) -> None:
    frame = request_frame(dpkt.dhcp.DHCPREQUEST,
                          extra=[(dpkt.dhcp.DHCP_OPT_REQ_IP, bytes((100, 64, 9, 9)))])
    reply = responder.answer(frame)
    assert reply is not None
    eth, ip, msg, opts = parse_reply(reply)
    assert opts[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes((dpkt.dhcp.DHCPNAK,))
    assert msg.yiaddr == 0 and dpkt.dhcp.DHCP_OPT_LEASE_SEC not in opts
    assert eth.dst == BCAST_MAC and ip.dst == b"\xff\xff\xff\xff"
    assert counters["dhcp_naks"] == 1


def test_broadcast_flag_is_honoured(responder: DhcpResponder) -> None:
    reply = responder.answer(request_frame(flags=0x8000))
    assert reply is not None
    eth, ip, msg, _ = parse_reply(reply)
    assert eth.dst == BCAST_MAC and ip.dst == b"\xff\xff\xff\xff" and msg.flags == 0x8000


def test_request_to_another_server_is_ignored(responder: DhcpResponder,
                                              counters: Counters) -> None:
    frame = request_frame(dpkt.dhcp.DHCPREQUEST, extra=[
        (dpkt.dhcp.DHCP_OPT_REQ_IP, GUEST_IP.packed),
        (dpkt.dhcp.DHCP_OPT_SERVER_ID, bytes((10, 0, 0, 1))),
    ])
    assert responder.answer(frame) is None
    assert counters["dhcp_drop_not_for_us"] == 1


@pytest.mark.parametrize("mtype", [dpkt.dhcp.DHCPRELEASE, dpkt.dhcp.DHCPDECLINE,
                                   dpkt.dhcp.DHCPINFORM])
def test_release_decline_inform_get_no_reply(responder: DhcpResponder, counters: Counters,
                                             mtype: int) -> None:
    assert responder.answer(request_frame(mtype)) is None
    assert sum(v for k, v in counters.snapshot().items() if k.startswith("dhcp_ignored_")) == 1
    assert not any(k.startswith("dhcp_drop_") for k in counters.snapshot())


def _drops(counters: Counters) -> dict[str, int]:
    return {k: v for k, v in counters.snapshot().items() if k.startswith("dhcp_drop_") and v}


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (request_frame(op=dpkt.dhcp.DHCP_OP_REPLY), "not_bootrequest"),
        (request_frame(dpkt.dhcp.DHCPOFFER), "unsupported_type"),
        (request_frame()[:200], "short"),
        (request_frame()[:14 + 20 + 8 + 100], "short"),
        (request_frame() + bytes(1600), "oversized"),
        (request_frame(magic=0x01020304), "bad_cookie"),
        # An option whose length runs past the end of the packet.
        (request_frame(options_raw=bytes((53, 1, 1, 12, 200, 65, 66))), "bad_options"),
        # No END option.
        (request_frame(options_raw=bytes((53, 1, 1))), "bad_options"),
        # Message type option with the wrong length.
        (request_frame(options_raw=bytes((53, 2, 1, 1, 255))), "bad_options"),
        (request_frame(None, options_raw=bytes((12, 1, 65, 255))), "no_message_type"),
        (request_frame(chaddr=OTHER_MAC), "not_for_us"),
        (request_frame(src_mac=OTHER_MAC), "not_for_us"),
        (request_frame(dst_mac=b"\x01\x00\x5e\x00\x00\x01"), "not_for_us"),
        (request_frame(dst_ip=bytes((10, 1, 2, 3))), "not_for_us"),
        (request_frame(ciaddr=int(IPv4Address("100.64.7.7"))), "not_for_us"),
    ],
    ids=["wrong-op", "server-type", "truncated-ip", "truncated-bootp", "oversized",
         "no-magic-cookie", "option-overflow", "no-end", "bad-type-length", "no-type",
         "other-chaddr", "other-source-mac", "multicast-dst", "other-dst-ip", "other-ciaddr"],
)
def test_bad_requests_are_dropped_and_counted(responder: DhcpResponder, counters: Counters,
                                              frame: bytes, reason: str) -> None:
    assert responder.answer(frame) is None
    assert _drops(counters) == {f"dhcp_drop_{reason}": 1}


@pytest.mark.hostile
def test_ip_header_checks(responder: DhcpResponder, counters: Counters) -> None:
    good = bytearray(request_frame())
    bad_sum = bytearray(good)
    bad_sum[24] ^= 0xFF
    assert responder.answer(bytes(bad_sum)) is None
    fragment = bytearray(good)
    fragment[20] |= 0x20  # MF
    struct.pack_into("!H", fragment, 24, 0)
    struct.pack_into("!H", fragment, 24, csum.checksum(bytes(fragment[14:34])))
    assert responder.answer(bytes(fragment)) is None
    bad_ulen = bytearray(good)
    struct.pack_into("!H", bad_ulen, 38, 9000)
    assert responder.answer(bytes(bad_ulen)) is None
    assert _drops(counters) == {"dhcp_drop_bad_ip_header": 1, "dhcp_drop_fragment": 1,
                                "dhcp_drop_bad_udp_length": 1}


def test_is_server_bound() -> None:
    assert dhcp.is_server_bound(request_frame()[: dhcp.peek_len()])
    assert dhcp.is_server_bound(memoryview(request_frame()))
    udp = dpkt.udp.UDP(sport=68, dport=53, data=b"x")
    ip = dpkt.ip.IP(src=b"\0" * 4, dst=b"\xff" * 4, p=17, data=udp)
    other = bytes(dpkt.ethernet.Ethernet(src=GUEST_MAC, dst=BCAST_MAC, type=0x0800, data=ip))
    assert not dhcp.is_server_bound(other)
    assert not dhcp.is_server_bound(request_frame()[:30])
    arp = BCAST_MAC + GUEST_MAC + b"\x08\x06" + bytes(28)
    assert not dhcp.is_server_bound(arp)


@pytest.mark.hostile
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    counters = Counters()
    responder = DhcpResponder(GUEST_MAC, LINK, counters)
    assert responder.answer(data) is None  # random bytes never make a valid request
    assert counters["dhcp_requests"] == 1
    assert sum(_drops(counters).values()) == 1
    dhcp.is_server_bound(data)


@pytest.mark.hostile
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_requests_never_raise(data: st.DataObject) -> None:
    """Valid requests with bytes flipped or cut anywhere: a reply or a counted drop."""
    frame = bytearray(request_frame(dpkt.dhcp.DHCPREQUEST,
                                    extra=[(dpkt.dhcp.DHCP_OPT_REQ_IP, GUEST_IP.packed)]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    counters = Counters()
    reply = DhcpResponder(GUEST_MAC, LINK, counters).answer(bytes(frame[:cut]))
    if reply is None:
        assert sum(_drops(counters).values()) + sum(
            v for k, v in counters.snapshot().items() if k.startswith("dhcp_ignored_")) == 1
    else:
        parse_reply(reply)


def test_allocation_follows_vmd() -> None:
    prefix = IPv4Network("100.64.0.0/10")
    a = allocate(prefix, 1, 0)
    assert (str(a.host), str(a.guest)) == ("100.64.1.2", "100.64.1.3")
    b = allocate(prefix, 3, 2)
    assert (str(b.host), str(b.guest)) == ("100.64.3.6", "100.64.3.7")
    assert allocate(prefix, 1, 0) == a  # deterministic
    assert int(a.host) % 2 == 0 and int(a.guest) == int(a.host) + 1
    with pytest.raises(LocalAddressError):
        allocate(prefix, 1 << 14, 0)  # beyond the /10
    with pytest.raises(LocalAddressError):
        allocate(prefix, 1, 0x7F)
    small = allocate(IPv4Network("10.9.0.0/16"), 255, 0)
    assert str(small.host) == "10.9.255.2"
    with pytest.raises(LocalAddressError):
        allocate(IPv4Network("10.9.0.0/16"), 256, 0)


def test_worker_flags_carry_the_local_link() -> None:
    base = ["--nic", "n", "--imsg-fd", "3", "--tap-fd", "4", "--features", "0x1"]
    args = parse_args([*base, "--mac", "fe:e1:ba:d0:01:00", "--locked",
                       "--local-guest", str(GUEST_IP), "--local-host", str(HOST_IP)])
    assert args.mac == GUEST_MAC and args.locked
    assert local_link(args) == LINK
    assert local_link(parse_args([*base, "--mac", "fe:e1:ba:d0:01:00"])) is None
    for bad in (["--local-guest", str(GUEST_IP), "--mac", "fe:e1:ba:d0:01:00"],  # no host side
                ["--locked"],  # no MAC
                ["--mac", "fe:e1:ba:d0:01"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
