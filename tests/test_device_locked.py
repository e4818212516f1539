"""locked lladdr and local interface (DHCP answered by vionet) at the device level.

The real Session, NetDevice and packet loops behind the fake front-end and a FakeTap
(tests/device_harness.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import dpkt
import pytest

from tests.device_harness import (
    BASE_ACKED,
    MAC_GUEST,
    MAC_HOST,
    FakeTap,
    Rig,
    ip_frame,
    raw_frame,
    running_device,
)
from tests.test_dhcp import parse_reply, request_frame
from vionet.counters import Counters
from vionet.device import RX_QUEUE, TX_QUEUE, NetDevice
from vionet.dhcp import LocalLink
from vionet.vnethdr import VnetHdr
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF

MRG = BASE_ACKED | int(NetF.MRG_RXBUF)
ZERO_HDR = bytes(VNET_HDR_LEN)
SPOOFED = bytes.fromhex("020000000099")
OTHER_DST = bytes.fromhex("02aabbccddee")
MULTICAST = bytes.fromhex("01005e000001")
BROADCAST = b"\xff" * 6
GUEST_IP = IPv4Address("100.64.1.3")
HOST_IP = IPv4Address("100.64.1.2")
LINK = LocalLink(guest=GUEST_IP, host=HOST_IP)


@pytest.fixture
def tap() -> Iterator[FakeTap]:
    t = FakeTap()
    yield t
    t.close()


def frame_from(src: bytes, seq: int, length: int = 80) -> bytes:
    """A frame from ``src`` to the host (the tap side)."""
    f = raw_frame(length, seq)
    return MAC_HOST + src + f[12:]


def frame_to(dst: bytes, seq: int, length: int = 80) -> bytes:
    """A frame from the host to ``dst`` (the tap hands it to the device)."""
    f = raw_frame(length, seq)
    return dst + MAC_HOST + f[12:]


def send(rig: Rig, frame: bytes, cuts: tuple[int, ...] = ()) -> None:
    head = rig.post_tx(frame, cuts=cuts)
    rig.kick(TX_QUEUE)
    used = rig.wait_used(TX_QUEUE, 1)
    assert [(u.head, u.length) for u in used] == [(head, 0)]


def assert_healthy(rig: Rig) -> None:
    assert rig.threads_alive()
    assert rig.ring_errors == []
    assert rig.counters["loop_crash"] == 0


# --- locked lladdr: TX ---------------------------------------------------------------------


@pytest.mark.hostile
@pytest.mark.parametrize("cuts", [(), (VNET_HDR_LEN + 3,), (5, VNET_HDR_LEN + 8, 40)],
                         ids=["one-buffer", "split-dst", "split-src"])
def test_locked_tx_drops_foreign_source(tap: FakeTap, cuts: tuple[int, ...]) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True) as rig:
        good = frame_from(MAC_GUEST, 1)
        send(rig, good, cuts)
        assert tap.read() == (ZERO_HDR, good)
        for seq in range(3):
            send(rig, frame_from(SPOOFED, 10 + seq), cuts)
        assert tap.idle(0.1), "a spoofed frame reached the tap"
        assert rig.counters["tx_drop_bad_source_address"] == 3
        send(rig, good, cuts)
        assert tap.read() == (ZERO_HDR, good)
        assert rig.counters["tx_packets"] == 2
        assert_healthy(rig)


@pytest.mark.hostile
def test_locked_tx_source_split_over_many_tiny_buffers(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True) as rig:
        cuts = tuple(range(VNET_HDR_LEN + 1, VNET_HDR_LEN + 14))  # one byte per descriptor
        send(rig, frame_from(MAC_GUEST[:5] + bytes((MAC_GUEST[5] ^ 1,)), 1), cuts)  # last bit
        assert tap.idle(0.1)
        assert rig.counters["tx_drop_bad_source_address"] == 1
        good = frame_from(MAC_GUEST, 2)
        send(rig, good, cuts)
        assert tap.read() == (ZERO_HDR, good)
        assert_healthy(rig)


def test_unlocked_tx_passes_any_source(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=False) as rig:
        spoofed = frame_from(SPOOFED, 1)
        send(rig, spoofed)
        assert tap.read() == (ZERO_HDR, spoofed)
        assert rig.counters["tx_drop_bad_source_address"] == 0


def test_bad_source_log_is_rate_limited(tap: FakeTap, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vionet.datapath"), \
            running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True) as rig:
        for seq in range(40):
            rig.post_tx(frame_from(SPOOFED, seq))
        rig.kick(TX_QUEUE)
        rig.wait_used(TX_QUEUE, 40)
        assert rig.counters["tx_drop_bad_source_address"] == 40
    lines = [r for r in caplog.records if "bad source address" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "02:00:00:00:00:99" in lines[0].getMessage()


# --- locked lladdr: RX ---------------------------------------------------------------------


def test_locked_rx_passes_own_unicast_broadcast_multicast(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True) as rig:
        rig.post_rx(8)
        rig.kick(RX_QUEUE)
        wanted = [frame_to(MAC_GUEST, 1), frame_to(BROADCAST, 2), frame_to(MULTICAST, 3)]
        tap.inject(frame_to(OTHER_DST, 100))
        for frame in wanted:
            tap.inject(frame)
            tap.inject(frame_to(OTHER_DST, 101))
        got = rig.recv_rx(3)
        assert [g.frame for g in got] == wanted
        assert all(g.hdr.num_buffers == 1 for g in got)
        assert rig.rx_idle(0.1)
        assert rig.counters["rx_drop_locked_destination"] == 4
        assert rig.counters["rx_packets"] == 3
        assert_healthy(rig)


@pytest.mark.hostile
def test_locked_rx_destination_split_across_buffers(tap: FakeTap) -> None:
    """The guest's first RX descriptor ends inside the destination MAC."""
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True) as rig:
        for _ in range(4):
            rig.rx.add(writable=[VNET_HDR_LEN + 3, 1536], expose=False)
        rig.rx.expose()
        rig.kick(RX_QUEUE)
        tap.inject(frame_to(OTHER_DST, 1))
        mine = frame_to(MAC_GUEST, 2)
        tap.inject(mine)
        [got] = rig.recv_rx(1)
        assert got.frame == mine
        assert rig.counters["rx_drop_locked_destination"] == 1


def test_unlocked_rx_passes_other_destinations(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST) as rig:
        rig.post_rx(2)
        rig.kick(RX_QUEUE)
        other = frame_to(OTHER_DST, 1)
        tap.inject(other)
        [got] = rig.recv_rx(1)
        assert got.frame == other
        assert rig.counters["rx_drop_locked_destination"] == 0


def test_locked_needs_a_mac() -> None:
    with pytest.raises(ValueError, match="MAC"):
        NetDevice(-1, Counters(), lambda acked: None, locked=True)
    with pytest.raises(ValueError, match="MAC"):
        NetDevice(-1, Counters(), lambda acked: None, local=LINK)


# --- local interface: DHCP answered in vionet, injected on RX -----------------------------


def discover() -> bytes:
    return request_frame(dpkt.dhcp.DHCPDISCOVER, chaddr=MAC_GUEST, src_mac=MAC_GUEST)


def request() -> bytes:
    return request_frame(dpkt.dhcp.DHCPREQUEST, chaddr=MAC_GUEST, src_mac=MAC_GUEST,
                         extra=[(dpkt.dhcp.DHCP_OPT_REQ_IP, GUEST_IP.packed),
                                (dpkt.dhcp.DHCP_OPT_SERVER_ID, HOST_IP.packed)])


def msg_type(frame: bytes) -> int:
    _, _, _, opts = parse_reply(frame)
    return opts[dpkt.dhcp.DHCP_OPT_MSGTYPE][0]


@pytest.mark.parametrize("acked", [BASE_ACKED, MRG], ids=["plain", "mrg-rxbuf"])
def test_local_dhcp_discover_request(tap: FakeTap, acked: int) -> None:
    with running_device(tap.device_fd, acked, mac=MAC_GUEST, local=LINK) as rig:
        rig.post_rx(4)
        rig.kick(RX_QUEUE)
        send(rig, discover())
        [offer] = rig.recv_rx(1)
        assert offer.hdr == VnetHdr(num_buffers=1)  # flags 0, no GSO, one buffer
        assert msg_type(offer.frame) == dpkt.dhcp.DHCPOFFER
        _, ip, msg, opts = parse_reply(offer.frame)
        assert msg.yiaddr == int(GUEST_IP) and ip.src == HOST_IP.packed
        assert opts[dpkt.dhcp.DHCP_OPT_NETMASK] == bytes((255, 255, 255, 254))

        send(rig, request())
        [ack] = rig.recv_rx(1)
        assert ack.hdr == VnetHdr(num_buffers=1)
        assert msg_type(ack.frame) == dpkt.dhcp.DHCPACK
        assert tap.idle(0.1), "a DHCP request leaked to the tap"
        c = rig.counters
        assert (c["dhcp_offers"], c["dhcp_acks"], c["rx_injected"]) == (1, 1, 2)
        assert c["tx_packets"] == 0 and c["rx_packets"] == 2
        assert_healthy(rig)


def test_local_other_traffic_goes_to_the_tap(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, local=LINK) as rig:
        frame = ip_frame("udp", b"hello", dport=53)
        send(rig, frame)
        assert tap.read() == (ZERO_HDR, frame)
        assert rig.counters["dhcp_requests"] == 0


@pytest.mark.hostile
def test_local_malformed_dhcp_is_dropped_not_forwarded(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, local=LINK) as rig:
        rig.post_rx(4)
        rig.kick(RX_QUEUE)
        bad_cookie = request_frame(chaddr=MAC_GUEST, src_mac=MAC_GUEST, magic=0xDEADBEEF)
        send(rig, bad_cookie)
        send(rig, discover()[:120])
        assert tap.idle(0.1)
        assert rig.rx_idle(0.1)
        assert rig.counters["dhcp_drop_bad_cookie"] == 1
        assert rig.counters["dhcp_drop_short"] == 1
        assert_healthy(rig)


def test_not_local_dhcp_goes_to_the_tap(tap: FakeTap) -> None:
    """Without a local interface DHCP is ordinary traffic (a server may sit on the switch)."""
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST) as rig:
        frame = discover()
        send(rig, frame)
        assert tap.read() == (ZERO_HDR, frame)


def test_injected_reply_waits_for_rx_buffers(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, local=LINK) as rig:
        send(rig, discover())
        time.sleep(0.1)
        assert rig.counters["rx_injected"] == 0
        rig.post_rx(1)
        rig.kick(RX_QUEUE)
        [offer] = rig.recv_rx(1)
        assert msg_type(offer.frame) == dpkt.dhcp.DHCPOFFER


def test_injected_frames_interleave_with_tap_frames(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, locked=True,
                        local=LINK) as rig:
        rig.post_rx(16)
        rig.kick(RX_QUEUE)
        from_tap = [frame_to(MAC_GUEST, seq) for seq in range(4)]
        tap.inject(from_tap[0])
        tap.inject(from_tap[1])
        send(rig, discover())
        tap.inject(from_tap[2])
        send(rig, request())
        tap.inject(from_tap[3])
        got = [g.frame for g in rig.recv_rx(6)]
        assert [f for f in got if f in from_tap] == from_tap
        replies = [msg_type(f) for f in got if f not in from_tap]
        assert replies == [dpkt.dhcp.DHCPOFFER, dpkt.dhcp.DHCPACK]
        assert rig.counters["rx_packets"] == 6
        assert_healthy(rig)


@pytest.mark.hostile
def test_inject_queue_is_bounded(tap: FakeTap) -> None:
    """A guest that floods DISCOVERs but posts no RX buffers cannot grow our memory."""
    with running_device(tap.device_fd, BASE_ACKED, mac=MAC_GUEST, local=LINK) as rig:
        for _ in range(40):
            rig.post_tx(discover())
        rig.kick(TX_QUEUE)
        rig.wait_used(TX_QUEUE, 40)
        assert rig.counters["dhcp_offers"] == 40
        assert rig.counters["rx_drop_inject_overflow"] == 40 - len(rig.device.injected)
        assert len(rig.device.injected) <= 16
        assert_healthy(rig)
