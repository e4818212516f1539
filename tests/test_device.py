"""The virtio-net device end to end: vhost-user Session + NetDevice + packet loops.

The test plays QEMU and the guest driver (tests/device_harness.py) against a fake tap (a
SOCK_SEQPACKET socketpair) and, in a network namespace, a real tap.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute

from parent import bridge
from parent.tap import Tap
from tests.device_harness import (
    BASE_ACKED,
    IP_GUEST,
    IP_HOST,
    MAC_GUEST,
    OFFERED,
    RAM_SIZE,
    FakeTap,
    Rig,
    ip_frame,
    partial,
    raw_frame,
    running_device,
)
from vionet import csum
from vionet.device import RX_QUEUE, TX_QUEUE
from vionet.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vionet.vnethdr import VnetHdr
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF, VnetGso

CSUM = BASE_ACKED | int(NetF.CSUM)
TSO = CSUM | int(NetF.HOST_TSO4)
MRG = BASE_ACKED | int(NetF.MRG_RXBUF)
GUEST_OFFLOADS = MRG | int(NetF.GUEST_CSUM | NetF.GUEST_TSO4)
ZERO_HDR = bytes(VNET_HDR_LEN)


@pytest.fixture
def tap() -> Iterator[FakeTap]:
    t = FakeTap()
    yield t
    t.close()


def send_and_check(rig: Rig, tap: FakeTap, frame: bytes, hdr: VnetHdr | bytes,
                   want_hdr: bytes, **post: object) -> None:
    """Post one TX chain, kick, and expect exactly ``want_hdr + frame`` out of the tap."""
    head = rig.post_tx(frame, hdr, **post)  # type: ignore[arg-type]
    rig.kick(TX_QUEUE)
    used = rig.wait_used(TX_QUEUE, 1)
    assert [(u.head, u.length) for u in used] == [(head, 0)]
    assert tap.read() == (want_hdr, frame)
    assert tap.idle(0.05)


def assert_healthy(rig: Rig) -> None:
    assert rig.threads_alive()
    assert rig.ring_errors == []
    assert rig.counters["loop_crash"] == 0


# --- TX ----------------------------------------------------------------------------------


def _tx_plain() -> tuple[int, bytes, VnetHdr, bytes]:
    return BASE_ACKED, raw_frame(60, 1), VnetHdr(), ZERO_HDR


def _tx_normalised() -> tuple[int, bytes, VnetHdr, bytes]:
    # Receive-only flags and num_buffers mean nothing on TX: the tap gets zeros.
    return BASE_ACKED, raw_frame(1514, 2), VnetHdr(flags=2, num_buffers=5), ZERO_HDR


def _tx_needs_csum() -> tuple[int, bytes, VnetHdr, bytes]:
    frame, hdr = partial(ip_frame("udp", b"u" * 300))
    return CSUM, frame, hdr, hdr.pack()


def _tx_gso_tcpv4() -> tuple[int, bytes, VnetHdr, bytes]:
    frame, csum_hdr = partial(ip_frame("tcp", bytes(range(256)) * 240))
    hdr = VnetHdr(1, int(VnetGso.TCPV4), 54, 1448, csum_hdr.csum_start, csum_hdr.csum_offset)
    assert len(frame) > 60000
    return TSO, frame, hdr, hdr.pack()


@pytest.mark.parametrize("case", [_tx_plain, _tx_normalised, _tx_needs_csum, _tx_gso_tcpv4],
                         ids=["plain", "normalised", "needs_csum", "gso_tcpv4"])
def test_tx_frame_reaches_tap_with_its_header(
    tap: FakeTap, case: Callable[[], tuple[int, bytes, VnetHdr, bytes]]
) -> None:
    acked, frame, hdr, want = case()
    with running_device(tap.device_fd, acked) as rig:
        assert rig.offloads == [acked & ~int(NetF.PROTOCOL_FEATURES)]
        send_and_check(rig, tap, frame, hdr, want)
        assert rig.calls[TX_QUEUE] >= 1  # the guest was interrupted
        assert rig.counters["tx_packets"] == 1
        assert rig.counters["tx_bytes"] == len(frame)
        assert_healthy(rig)


def test_tx_batch_completes_every_chain_in_order(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED) as rig:
        frames = [raw_frame(60 + k * 7, k) for k in range(100)]
        heads = [rig.post_tx(f, expose=False) for f in frames]
        rig.tx.expose()
        rig.kick(TX_QUEUE)
        used = rig.wait_used(TX_QUEUE, 100)
        assert [u.head for u in used] == heads
        assert [tap.read()[1] for _ in frames] == frames
        assert tap.idle(0.05)


@pytest.mark.parametrize(
    "cuts",
    [
        [5],  # header in two descriptors
        [3, 8],  # header in three
        [12, *range(40, 1000, 40)],  # frame in 25 descriptors
        [1, 2, 7, *range(13, 400, 3)],  # header in four, frame in 130
        [4, 6, 20, 21, 22, 30],  # header and frame sharing a descriptor
    ],
    ids=["hdr2", "hdr3", "frame25", "hdr4_frame130", "shared"],
)
def test_tx_scattered_header_and_frame(tap: FakeTap, cuts: list[int]) -> None:
    frame, hdr = partial(ip_frame("udp", bytes(range(200)) * 5))
    with running_device(tap.device_fd, CSUM) as rig:
        send_and_check(rig, tap, frame, hdr, hdr.pack(), cuts=cuts)
        assert rig.tx.read_desc(0)[2] & VIRTQ_DESC_F_NEXT  # it really was a chain
        assert_healthy(rig)


def test_tx_indirect_not_acked_is_dropped_and_counted(tap: FakeTap) -> None:
    # Offered, but this guest did not ack INDIRECT_DESC: an indirect chain is a bad chain.
    assert not BASE_ACKED & NetF.RING_INDIRECT_DESC
    with running_device(tap.device_fd, BASE_ACKED) as rig:
        bad = rig.post_tx(raw_frame(100, 1), cuts=[12, 50], indirect=True)
        assert rig.tx.read_desc(bad)[2] == VIRTQ_DESC_F_INDIRECT
        good = rig.post_tx(raw_frame(100, 2))
        rig.kick(TX_QUEUE)
        assert [(u.head, u.length) for u in rig.wait_used(TX_QUEUE, 2)] == [(bad, 0), (good, 0)]
        assert tap.read() == (ZERO_HDR, raw_frame(100, 2))
        assert tap.idle(0.05)
        assert rig.counters["tx_drop_indirect_not_negotiated"] == 1
        assert rig.counters["tx_packets"] == 1
        assert_healthy(rig)


def test_tx_indirect_when_negotiated(tap: FakeTap) -> None:
    acked = CSUM | int(NetF.RING_INDIRECT_DESC)
    with running_device(tap.device_fd, acked,
                        offered=OFFERED | int(NetF.RING_INDIRECT_DESC)) as rig:
        frame, hdr = partial(ip_frame("tcp", b"t" * 900))
        send_and_check(rig, tap, frame, hdr, hdr.pack(), cuts=[6, 12, 100, 101], indirect=True)
        assert rig.tx.read_desc(0)[2] == VIRTQ_DESC_F_INDIRECT
        assert_healthy(rig)


# --- TX: hostile guests ------------------------------------------------------------------


@dataclass
class Bad:
    acked: int
    post: Callable[[Rig], object]


def _crafted(rig: Rig, descs: list[tuple[int, int, int, int]]) -> None:
    """Post a hand-made chain: (addr, len, flags, next index in ``descs``) per descriptor."""
    ids = rig.tx.free[: len(descs)]
    for k, (addr, length, flags, nxt) in enumerate(descs):
        rig.tx.write_desc(ids[k], addr, length, flags, ids[nxt] if nxt < len(ids) else nxt)
    rig.tx.track(ids[0], ids)
    rig.tx.post(ids[0])


def _data(rig: Rig, data: bytes) -> int:
    gpa = rig.tx.alloc(len(data))
    rig.tx.write(gpa, data)
    return gpa


def _gso_hdr() -> VnetHdr:
    return VnetHdr(1, int(VnetGso.TCPV4), 54, 1448, 34, 16)


HOSTILE_TX = {
    "needs_csum_not_negotiated": Bad(
        BASE_ACKED, lambda r: r.post_tx(*partial(ip_frame("udp", b"x" * 64)))),
    "gso_not_negotiated": Bad(
        CSUM, lambda r: r.post_tx(partial(ip_frame("tcp", b"g" * 5000))[0], _gso_hdr())),
    "bad_csum_offsets": Bad(
        CSUM, lambda r: r.post_tx(raw_frame(100), VnetHdr(flags=1, csum_start=90,
                                                          csum_offset=16))),
    "runt": Bad(BASE_ACKED, lambda r: r.post_tx(raw_frame(13))),
    "too_big": Bad(BASE_ACKED, lambda r: r.post_tx(raw_frame(1519))),
    "chain_too_big": Bad(TSO, lambda r: r.post_tx(raw_frame(70000), cuts=[12, 35000])),
    "short_header": Bad(BASE_ACKED, lambda r: r.tx.add([b"\0" * 8])),
    "buffer_outside_memory": Bad(BASE_ACKED, lambda r: _crafted(r, [
        (_data(r, ZERO_HDR), 12, VIRTQ_DESC_F_NEXT, 1),
        (RAM_SIZE + 4096, 100, 0, 0),
    ])),
    "loop": Bad(BASE_ACKED, lambda r: _crafted(r, [
        (_data(r, ZERO_HDR), 12, VIRTQ_DESC_F_NEXT, 1),
        (_data(r, raw_frame(60)), 60, VIRTQ_DESC_F_NEXT, 0),
    ])),
    "next_out_of_range": Bad(BASE_ACKED, lambda r: _crafted(r, [
        (_data(r, ZERO_HDR), 12, VIRTQ_DESC_F_NEXT, 999),
    ])),
    "writable_descriptor": Bad(
        BASE_ACKED, lambda r: r.tx.add([ZERO_HDR + raw_frame(60)], writable=[64])),
    "read_after_write": Bad(BASE_ACKED, lambda r: _crafted(r, [
        (_data(r, bytes(64)), 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
        (_data(r, ZERO_HDR + raw_frame(60)), 72, 0, 0),
    ])),
}


@pytest.mark.hostile
@pytest.mark.parametrize("reason", sorted(HOSTILE_TX))
def test_tx_hostile_chain_dropped_counted_and_loop_survives(tap: FakeTap, reason: str) -> None:
    bad = HOSTILE_TX[reason]
    with running_device(tap.device_fd, bad.acked) as rig:
        bad.post(rig)
        good = raw_frame(200, 7)
        head = rig.post_tx(good)
        rig.kick(TX_QUEUE)
        used = rig.wait_used(TX_QUEUE, 2)
        assert used[1].head == head
        assert all(u.length == 0 for u in used)
        assert tap.read() == (ZERO_HDR, good)  # the bad one never reached the tap
        assert tap.idle(0.05)
        drops = {k: v for k, v in rig.counters.snapshot().items() if "drop" in k}
        assert drops == {f"tx_drop_{reason}": 1}
        assert rig.counters["tx_packets"] == 1
        assert_healthy(rig)


# --- RX ----------------------------------------------------------------------------------


def test_rx_without_mrg_one_buffer_per_frame(tap: FakeTap) -> None:
    with running_device(tap.device_fd, BASE_ACKED) as rig:
        heads = rig.post_rx(4, 1536)
        rig.kick(RX_QUEUE)
        frames = [raw_frame(1514, 1), raw_frame(60, 2)]
        for f in frames:
            tap.inject(f)
        got = rig.recv_rx(2)
        assert [g.frame for g in got] == frames
        assert [g.used[0].head for g in got] == heads[:2]
        assert [g.used[0].length for g in got] == [len(f) + VNET_HDR_LEN for f in frames]
        assert all(g.hdr == VnetHdr(num_buffers=1) for g in got)
        assert rig.calls[RX_QUEUE] >= 1
        assert rig.counters["rx_packets"] == 2
        assert rig.counters["rx_bytes"] == sum(map(len, frames))
        assert rig.counters["rx_small_buffer"] == 0
        assert_healthy(rig)


def test_rx_mrg_frames_span_small_buffers(tap: FakeTap) -> None:
    with running_device(tap.device_fd, GUEST_OFFLOADS) as rig:
        rig.post_rx(120, 1536)
        rig.kick(RX_QUEUE)
        jumbo = raw_frame(9000, 3)
        gso, csum_hdr = partial(ip_frame("tcp", bytes(range(250)) * 240, src_mac=b"\2" * 6))
        gso_hdr = VnetHdr(1, int(VnetGso.TCPV4), 54, 1448, csum_hdr.csum_start,
                          csum_hdr.csum_offset)
        tap.inject(jumbo)
        tap.inject(gso, gso_hdr)
        got = rig.recv_rx(2)
        for g, frame, hdr in ((got[0], jumbo, VnetHdr()), (got[1], gso, gso_hdr)):
            n = len(frame) + VNET_HDR_LEN
            assert g.frame == frame
            assert g.hdr.num_buffers == len(g.used) == -(-n // 1536)
            assert sum(u.length for u in g.used) == n
            assert all(u.length == 1536 for u in g.used[:-1])
            assert g.hdr == VnetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size,
                                    hdr.csum_start, hdr.csum_offset, len(g.used))
        assert rig.counters["rx_packets"] == 2
        assert_healthy(rig)


@pytest.mark.parametrize(("acked", "bufsize"), [(BASE_ACKED, 1536), (MRG, 1536), (MRG, 100)],
                         ids=["plain", "mrg", "mrg_tiny_buffers"])
def test_rx_partial_csum_completed_for_guest_without_guest_csum(
    tap: FakeTap, acked: int, bufsize: int
) -> None:
    frame, hdr = partial(ip_frame("udp", b"p" * 700, src_mac=b"\2" * 6))
    assert csum.verify(frame) is False
    with running_device(tap.device_fd, acked) as rig:
        rig.post_rx(40, bufsize)
        rig.kick(RX_QUEUE)
        tap.inject(frame, hdr)
        (got,) = rig.recv_rx(1)
        assert got.hdr == VnetHdr(num_buffers=len(got.used))
        assert csum.verify(got.frame) is True
        assert got.frame[:40] == frame[:40]  # only the checksum field changed
        assert rig.counters["rx_csum_completed"] == 1
        assert_healthy(rig)


def test_rx_partial_csum_passed_through_to_guest_with_guest_csum(tap: FakeTap) -> None:
    frame, hdr = partial(ip_frame("tcp", b"q" * 500, src_mac=b"\2" * 6))
    with running_device(tap.device_fd, MRG | int(NetF.GUEST_CSUM)) as rig:
        rig.post_rx(8)
        rig.kick(RX_QUEUE)
        tap.inject(frame, hdr)
        tap.inject(raw_frame(80), VnetHdr(flags=2))  # DATA_VALID passes too
        got = rig.recv_rx(2)
        assert got[0].frame == frame
        assert got[0].hdr == VnetHdr(1, 0, 0, 0, hdr.csum_start, hdr.csum_offset, 1)
        assert got[1].hdr == VnetHdr(flags=2, num_buffers=1)
        assert rig.counters["rx_csum_completed"] == 0


@pytest.mark.parametrize("acked", [MRG, MRG | int(NetF.GUEST_CSUM), BASE_ACKED],
                         ids=["mrg", "guest_csum_no_tso", "plain"])
def test_rx_gso_to_guest_without_guest_tso_dropped(tap: FakeTap, acked: int) -> None:
    gso, csum_hdr = partial(ip_frame("tcp", b"z" * 20000, src_mac=b"\2" * 6))
    gso_hdr = VnetHdr(1, int(VnetGso.TCPV4), 54, 1448, csum_hdr.csum_start,
                      csum_hdr.csum_offset)
    with running_device(tap.device_fd, acked) as rig:
        heads = rig.post_rx(4)
        rig.kick(RX_QUEUE)
        tap.inject(gso, gso_hdr)
        after = raw_frame(300, 9)
        tap.inject(after)
        (got,) = rig.recv_rx(1)
        assert got.frame == after
        assert got.used[0].head == heads[0]  # the dropped frame's buffer took the next one
        assert rig.counters["rx_drop_rx_gso_unsupported"] == 1
        assert rig.counters["rx_packets"] == 1
        assert rig.rx_idle(0.05)
        assert_healthy(rig)


def test_rx_frames_wait_for_buffers(tap: FakeTap) -> None:
    with running_device(tap.device_fd, MRG) as rig:
        frames = [raw_frame(100 + k, k) for k in range(20)]
        for f in frames:
            tap.inject(f)
        assert rig.rx_idle(0.2)
        rig.post_rx(5)
        rig.kick(RX_QUEUE)
        got = rig.recv_rx(5)
        assert rig.rx_idle(0.1)  # the other 15 still wait, nothing dropped
        rig.post_rx(30)
        rig.kick(RX_QUEUE)
        got += rig.recv_rx(15)
        assert [g.frame for g in got] == frames
        assert {k for k in rig.counters.snapshot() if "drop" in k} == set()
        assert_healthy(rig)


def test_stop_returns_base_without_stashed_buffers_and_resumes_into_them(tap: FakeTap) -> None:
    acked = GUEST_OFFLOADS  # GSO: the RX loop stashes ~43 buffers of 1536 ahead
    with running_device(tap.device_fd, acked) as rig:
        heads = rig.post_rx(100)
        rig.kick(RX_QUEUE)
        for k in range(3):
            tap.inject(raw_frame(1000, k))
        got = rig.recv_rx(3)
        assert [g.used[0].head for g in got] == heads[:3]
        sent = [raw_frame(60, 100 + k) for k in range(4)]
        for f in sent[:2]:
            rig.post_tx(f)
        rig.kick(TX_QUEUE)
        rig.wait_used(TX_QUEUE, 2)
        assert rig.rx_idle(0.05)

        assert rig.stop() == [3, 2]  # not 3 + the stashed buffers
        assert rig.device.loops == {}
        assert rig.offloads[-1] == 0  # stopped: no tap offloads meanwhile

        # Frames arriving while stopped wait in the tap.
        for k in range(3, 6):
            tap.inject(raw_frame(1000, k))
        rig.resume([3, 2])
        assert rig.offloads[-1] == acked & ~int(NetF.PROTOCOL_FEATURES)
        got = rig.recv_rx(3)
        assert [g.frame for g in got] == [raw_frame(1000, k) for k in range(3, 6)]
        assert [g.used[0].head for g in got] == heads[3:6]  # the same buffers, each once
        for f in sent[2:]:
            rig.post_tx(f)
        rig.kick(TX_QUEUE)
        rig.wait_used(TX_QUEUE, 2)
        assert [tap.read()[1] for _ in range(4)] == sent
        # The remaining 94 buffers, each used exactly once (get_used checks "not a head").
        # With GSO the loop reads only with room for a 64 KiB frame posted: add some.
        for k in range(94):
            tap.inject(raw_frame(100, k))
        extra = rig.post_rx(50)
        rig.kick(RX_QUEUE)
        got = rig.recv_rx(94)
        assert [g.used[0].head for g in got] == heads[6:]
        assert rig.rx_idle(0.05)
        assert set(rig.rx.outstanding) == set(extra)
        assert_healthy(rig)


def test_new_memory_table_on_running_rings_keeps_features(tap: FakeTap) -> None:
    """QEMU sends SET_MEM_TABLE to running rings (memory hotplug) without SET_FEATURES."""
    acked = CSUM | int(NetF.MRG_RXBUF)
    with running_device(tap.device_fd, acked) as rig:
        rig.fe.set_mem_table()
        rig.fe.sync()
        assert rig.threads_alive()
        frame, hdr = partial(ip_frame("udp", b"m" * 100))
        send_and_check(rig, tap, frame, hdr, hdr.pack())
        rig.post_rx(3, 800)
        rig.kick(RX_QUEUE)
        tap.inject(raw_frame(1200, 1))
        (got,) = rig.recv_rx(1)
        assert got.hdr.num_buffers == 2 and got.frame == raw_frame(1200, 1)
        plain = acked & ~int(NetF.PROTOCOL_FEATURES)
        assert rig.offloads == [plain, 0, plain]
        assert_healthy(rig)


# --- sustained load ----------------------------------------------------------------------

LOAD = 20_000


def test_sustained_load_with_index_wraparound(tap: FakeTap) -> None:
    bases = (65535 - 77, 65535 - 130)
    with running_device(tap.device_fd, MRG, bases=bases) as rig:
        t0 = time.monotonic()
        # TX: keep up to 192 chains in flight, check every frame out of the tap in order.
        sizes = [60 + (k * 37) % 1455 for k in range(LOAD)]
        posted = done = seen = 0
        heads_out: set[int] = set()
        while seen < LOAD or done < LOAD:
            while posted < LOAD and posted - done < 192:
                heads_out.add(rig.post_tx(raw_frame(sizes[posted], posted), expose=False))
                posted += 1
            rig.tx.expose()
            rig.kick(TX_QUEUE)
            for u in rig.wait_used(TX_QUEUE, min(32, posted - done)):
                heads_out.remove(u.head)
                done += 1
            for hdr, frame in tap.read_ready():
                assert hdr == ZERO_HDR
                assert frame == raw_frame(sizes[seen], seen)
                seen += 1
            if done == posted and seen < done:
                hdr, frame = tap.read()
                assert frame == raw_frame(sizes[seen], seen)
                seen += 1
        assert done == posted == LOAD and not heads_out
        assert rig.tx.used_idx() == (bases[1] + LOAD) & 0xFFFF
        t_tx = time.monotonic() - t0

        # RX: keep the ring full of buffers, the tap a few hundred frames ahead.
        injected = received = 0
        rig.post_rx(256)
        rig.kick(RX_QUEUE)
        while received < LOAD:
            while injected < LOAD and injected - received < 400:
                tap.inject(raw_frame(sizes[injected], injected))
                injected += 1
            for g in rig.recv_rx(min(64, injected - received)):
                assert g.hdr.num_buffers == 1
                assert g.frame == raw_frame(sizes[received], received)
                received += 1
            rig.post_rx(len(rig.rx.free))
            rig.kick(RX_QUEUE)
        assert rig.rx.used_idx() == (bases[0] + LOAD) & 0xFFFF
        drops = {k: v for k, v in rig.counters.snapshot().items() if "drop" in k}
        assert drops == {}
        assert rig.counters["tx_packets"] == rig.counters["rx_packets"] == LOAD
        assert_healthy(rig)
        t_rx = time.monotonic() - t0 - t_tx
        assert t_tx < 25 and t_rx < 25, (t_tx, t_rx)


# --- a real tap in a network namespace ---------------------------------------------------

TAP_NAME = "vdtdev0"


@pytest.fixture
def real_tap(in_netns: str) -> Iterator[Tap]:
    tap = Tap.open(TAP_NAME)
    try:
        # No IPv6 chatter (router solicitations, MLD) on the guest's RX ring.
        with open(f"/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6", "w") as f:
            f.write("1")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=TAP_NAME)[0]
            ipr.addr("add", index=idx, address=socket.inet_ntoa(IP_HOST), prefixlen=24)
        bridge.set_up(TAP_NAME)
        yield tap
    finally:
        tap.close()


def _tap_mac() -> bytes:
    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=TAP_NAME)[0])[0]
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def test_real_tap_guest_to_host_and_back(real_tap: Tap) -> None:
    host_mac = _tap_mac()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
         socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)) as pkt:
        udp.bind((socket.inet_ntoa(IP_HOST), 9999))
        udp.settimeout(5)
        pkt.bind((TAP_NAME, 0))
        with running_device(real_tap.fd, MRG | int(NetF.CSUM)) as rig:
            # Guest -> host: a UDP datagram with a full checksum, then one NEEDS_CSUM.
            plain = ip_frame("udp", b"hello host", dst_mac=host_mac)
            part, hdr = partial(ip_frame("udp", b"partial csum", dst_mac=host_mac))
            rig.post_tx(plain)
            rig.post_tx(part, hdr)
            rig.kick(TX_QUEUE)
            rig.wait_used(TX_QUEUE, 2)
            assert udp.recvfrom(100) == (b"hello host", (socket.inet_ntoa(IP_GUEST), 40000))
            assert udp.recvfrom(100)[0] == b"partial csum"
            assert rig.counters["tx_packets"] == 2

            # Host -> guest: a frame sent on the tap lands in the RX ring.
            rig.post_rx(16)
            rig.kick(RX_QUEUE)
            frame = ip_frame("udp", b"hello guest", src_mac=host_mac, dst_mac=MAC_GUEST,
                             src_ip=IP_HOST, dst_ip=IP_GUEST)
            pkt.send(frame)
            deadline = time.monotonic() + 5
            while True:
                (got,) = rig.recv_rx(1, timeout=max(deadline - time.monotonic(), 0.01))
                if got.frame == frame:
                    break
            assert got.hdr == VnetHdr(num_buffers=1)
            assert csum.verify(got.frame) is True

            # The host stack talking to the guest: ARP first, answered by the guest.
            udp.sendto(b"reply", (socket.inet_ntoa(IP_GUEST), 40000))
            arp = _wait_rx(rig, lambda f: f[12:14] == b"\x08\x06")
            assert arp[28:32] == IP_HOST and arp[38:42] == IP_GUEST  # who-has guest
            reply = (host_mac + MAC_GUEST + b"\x08\x06" + arp[14:20] + b"\x00\x02"
                     + MAC_GUEST + IP_GUEST + host_mac + IP_HOST)
            rig.post_tx(reply)
            rig.kick(TX_QUEUE)
            rig.wait_used(TX_QUEUE, 1)
            data = _wait_rx(rig, lambda f: f[12:14] == b"\x08\x00" and f[23] == 17)
            assert data.endswith(b"reply") and csum.verify(data) is True
            assert_healthy(rig)


def _wait_rx(rig: Rig, match: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        (got,) = rig.recv_rx(1, timeout=max(deadline - time.monotonic(), 0.01))
        if match(got.frame):
            return got.frame
        rig.post_rx(1)
        rig.kick(RX_QUEUE)


def test_real_tap_tx_burst_all_seen_on_host(real_tap: Tap) -> None:
    host_mac = _tap_mac()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5)) as pkt, \
         running_device(real_tap.fd, BASE_ACKED) as rig:
        pkt.bind((TAP_NAME, 0x88B5))
        frames = [host_mac + raw_frame(60 + k, k)[6:] for k in range(200)]
        for f in frames:
            rig.post_tx(f, expose=False)
        rig.tx.expose()
        rig.kick(TX_QUEUE)
        rig.wait_used(TX_QUEUE, 200)
        seen: list[bytes] = []
        while len(seen) < 200:
            ready, _, _ = select.select([pkt], [], [], 5)
            assert ready, f"{len(seen)} of 200 frames seen on the host"
            seen.append(pkt.recv(2000))
        assert seen == frames
        assert rig.counters["tx_packets"] == 200
        assert_healthy(rig)
