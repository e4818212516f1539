"""The latency-oriented datapath: RX buffer coalescing, Chain.waddr, and the Engine's kick,
busy-poll and owed-interrupt logic, driven through FakeDriver rings and a FakeTap.

The ring tests call ``run_once`` by hand (no thread: fully deterministic); the engine tests run
the real Engine thread and play a Linux-like guest that kicks only when ``needs_kick`` says so.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.device_harness import FakeTap, raw_frame
from tests.virtio_harness import FakeDriver, Used, make_memory
from vionet import datapath
from vionet.counters import Counters
from vionet.datapath import (
    RX_COALESCE_US,
    RX_STREAM_US,
    TX_COALESCE_US,
    Engine,
    QueueLoop,
    RxLoop,
    TxLoop,
)
from vionet.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Chain
from vionet.vnethdr import VnetHdr
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF

BASE = int(NetF.VERSION_1)
MRG = BASE | int(NetF.MRG_RXBUF)
MB = 1 << 20
# Without guest offloads the RX stash holds this many bytes before it reads a frame.
MAX_FRAME = VNET_HDR_LEN + datapath.MAX_PLAIN_FRAME
PLAIN_HDR = VnetHdr().pack()


@dataclass
class Rig:
    drv: FakeDriver
    loop: QueueLoop
    engine: Engine
    tap: FakeTap
    kick_fd: int
    call_fd: int
    counters: Counters
    errors: list[str] = field(default_factory=list)

    def kick_if_needed(self, old: int) -> bool:
        """Kick as Linux does: only if avail moved past the device's avail_event."""
        if self.drv.needs_kick(old):
            os.eventfd_write(self.kick_fd, 1)
            return True
        return False

    def call_pending(self, timeout: float = 0.0) -> bool:
        """Whether the call eventfd is (or becomes, within ``timeout``) readable; consumes it."""
        ready, _, _ = select.select([self.call_fd], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call_fd)
        return True

    def post_tx(self, frame: bytes) -> bool:
        """Post one TX frame, reclaiming completions first; whether it kicked."""
        self.drv.get_used()
        old = self.drv.avail_idx
        self.drv.add([PLAIN_HDR + frame])
        return self.kick_if_needed(old)


@contextlib.contextmanager
def make_rig(
    cls: type[QueueLoop],
    acked: int,
    *,
    engine: Engine | None = None,
    size: int = 64,
    layout: tuple[tuple[int, int], ...] = ((0, 4 * MB),),
    data_gpa: int | None = None,
    start: bool = False,
) -> Iterator[Rig]:
    mem, _ = make_memory(layout)
    drv = FakeDriver(mem, size, event_idx=True, data_gpa=data_gpa)
    q = drv.queue(indirect=True)
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    tap = FakeTap()
    counters = Counters()
    engine = engine or Engine(poll_us=0)
    rig = Rig(drv, cls(q, kick_fd, call_fd, tap.device_fd, acked, counters,
                       lambda why: None, None, engine),
              engine, tap, kick_fd, call_fd, counters)
    rig.loop.on_ring_error = rig.errors.append
    started = False
    try:
        if start:
            rig.loop.start()
            started = True
        yield rig
    finally:
        if started:
            rig.loop.stop()
        tap.close()
        os.close(kick_fd)
        os.close(call_fd)
    assert rig.errors == []
    assert rig.counters["loop_crash"] == 0


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.0005)


def wgpa(drv: FakeDriver, head: int) -> list[tuple[int, int]]:
    """(gpa, len) of each writable buffer of an outstanding chain."""
    return list(drv.outstanding[head].writable)


def rx_frames(used: list[Used]) -> list[tuple[VnetHdr, bytes, list[Used]]]:
    """Reassemble MRG_RXBUF frames: (header, frame, the used elements it took)."""
    out = []
    k = 0
    while k < len(used):
        hdr = VnetHdr.unpack(used[k].written[:VNET_HDR_LEN])
        assert hdr.num_buffers >= 1, hdr
        group = used[k : k + hdr.num_buffers]
        assert len(group) == hdr.num_buffers, f"frame at {k}: {hdr.num_buffers} buffers wanted"
        data = b"".join(u.written for u in group)
        out.append((hdr, data[VNET_HDR_LEN:], group))
        k += hdr.num_buffers
    return out


def views_bytes(loop: RxLoop) -> int:
    return sum(len(v) for v in loop._views)


def rx_loop(rig: Rig) -> RxLoop:
    assert isinstance(rig.loop, RxLoop)
    return rig.loop


def run_rx(rig: Rig) -> None:
    """One engine pass for the RX loop, as if poll reported the tap readable."""
    rig.engine.tap_ready = True
    rig.loop.run_once()


def check_stash_invariants(loop: RxLoop) -> None:
    room = sum(c.write_len for c in loop._stash)
    assert views_bytes(loop) == loop._room == room, "the iov no longer matches the stash"


# -- RX coalescing ---------------------------------------------------------------------------


def _post_rx(drv: FakeDriver, sizes: list[list[int]], gap: int = 0) -> list[int]:
    heads = []
    for writable in sizes:
        if gap:
            drv.alloc(gap)  # leave a hole so the next buffer is not adjacent
        heads.append(drv.add(writable=writable, expose=False))
    drv.expose()
    return heads


def _check_frames_land(rig: Rig, heads: list[int], frames: list[bytes], sizes: list[int]) -> None:
    """Each frame lands byte-exact in the next unused chains, with the right lengths."""
    used = rig.drv.get_used()
    got = rx_frames(used)
    assert [g[1] for g in got] == frames
    k = 0
    for (hdr, _frame, group), frame in zip(got, frames, strict=True):
        n = len(frame) + VNET_HDR_LEN
        want_heads, left = [], n
        while left > 0:
            want_heads.append(heads[k])
            left -= sizes[k]
            k += 1
        assert [u.head for u in group] == want_heads, "the frame did not start in the next buffer"
        assert hdr == VnetHdr(num_buffers=len(want_heads))
        assert sum(u.length for u in group) == n
        assert [u.length for u in group[:-1]] == sizes[k - len(group) : k - 1]


def _deliver(rig: Rig, heads: list[int], frames: list[bytes], sizes: list[int]) -> None:
    """The tap hands the loop these frames; each must land as _check_frames_land says."""
    for f in frames:
        rig.tap.inject(f)
    run_rx(rig)
    _check_frames_land(rig, heads, frames, sizes)


def test_adjacent_rx_buffers_share_one_view_and_frames_land_exactly() -> None:
    with make_rig(RxLoop, MRG) as rig:
        loop = rx_loop(rig)
        heads = _post_rx(rig.drv, [[256]] * 24)
        gpas = [wgpa(rig.drv, h)[0][0] for h in heads]
        assert all(b - a == 256 for a, b in itertools.pairwise(gpas)), "not adjacent"
        run_rx(rig)  # tap empty: the loop only stashes buffers
        stashed = -(-MAX_FRAME // 256)
        assert len(loop._stash) == stashed
        assert len(loop._views) == 1 < stashed
        assert len(loop._views[0]) == 256 * stashed
        check_stash_invariants(loop)
        # The one view is the guest's memory from the first buffer on.
        loop._views[0][0:4] = b"MARK"
        loop._views[0][-4:] = b"TAIL"
        assert rig.drv.read(gpas[0], 4) == b"MARK"
        assert rig.drv.read(gpas[stashed - 1] + 252, 4) == b"TAIL"
        loop._views[0][0:4] = bytes(4)
        loop._views[0][-4:] = bytes(4)

        # 612, 1012 and 72 bytes with the header: 3, 4 and 1 buffers, the third of the
        # first frame only partly used (its rest must not take the next frame).
        frames = [raw_frame(600, 1), raw_frame(1000, 2), raw_frame(60, 3)]
        _deliver(rig, heads, frames, [256] * 24)
        assert rig.drv.read(gpas[2] + 100, 156) == bytes(156), "a frame spilled into a tail"
        assert len(loop._views) == 1
        check_stash_invariants(loop)
        assert rig.counters["rx_packets"] == 3

        # And again after the trim: the next frame starts in the ninth buffer.
        more = [raw_frame(1400, 4)]
        _deliver(rig, heads[8:], more, [256] * 16)
        check_stash_invariants(loop)


def test_rx_buffers_with_gaps_are_not_merged() -> None:
    with make_rig(RxLoop, MRG) as rig:
        loop = rx_loop(rig)
        heads = _post_rx(rig.drv, [[256]] * 16, gap=32)
        gpas = [wgpa(rig.drv, h)[0][0] for h in heads]
        assert all(b - a > 256 for a, b in itertools.pairwise(gpas))
        run_rx(rig)
        assert len(loop._views) == len(loop._stash) == -(-MAX_FRAME // 256)
        check_stash_invariants(loop)
        frames = [raw_frame(600, 1), raw_frame(1000, 2), raw_frame(60, 3)]
        _deliver(rig, heads, frames, [256] * 16)
        assert len(loop._views) == len(loop._stash)
        check_stash_invariants(loop)


def test_chain_with_two_writable_descriptors_is_never_merged() -> None:
    with make_rig(RxLoop, MRG) as rig:
        loop = rx_loop(rig)
        pattern = [[256], [128, 128], [256], [256]]
        heads = _post_rx(rig.drv, pattern * 4)
        bufs = [b for h in heads for b in wgpa(rig.drv, h)]
        assert all(b[0] - a[0] == a[1] for a, b in itertools.pairwise(bufs))
        run_rx(rig)
        # Stashed: A, B(128+128), C, D, A2, B2(128+128): C, D and A2 share one view; the
        # split chains' buffers stay separate although every buffer is adjacent.
        assert len(loop._stash) == 6
        assert [len(v) for v in loop._views] == [256, 128, 128, 768, 128, 128]
        check_stash_invariants(loop)
        frames = [raw_frame(600, 1), raw_frame(1000, 2), raw_frame(60, 3), raw_frame(300, 4)]
        _deliver(rig, heads, frames, [256] * 16)
        check_stash_invariants(loop)


def test_adjacent_buffers_in_different_regions_stay_separate_views() -> None:
    region = 0x10000
    with make_rig(RxLoop, MRG, size=16, layout=((0, region), (region, region)),
                  data_gpa=region - 512) as rig:
        loop = rx_loop(rig)
        heads = _post_rx(rig.drv, [[256]] * 12)
        assert wgpa(rig.drv, heads[2])[0][0] == region
        run_rx(rig)
        assert [len(v) for v in loop._views] == [512, 1024]
        check_stash_invariants(loop)
        frames = [raw_frame(600, 1), raw_frame(1000, 2)]
        _deliver(rig, heads, frames, [256] * 12)
        check_stash_invariants(loop)


# -- Chain.waddr -----------------------------------------------------------------------------


def test_chain_waddr_is_the_first_non_empty_writable_buffer() -> None:
    mem, _ = make_memory(((0, MB),))
    drv = FakeDriver(mem, 16)
    q = drv.queue(indirect=True)

    head = drv.add([b"r" * 10], [100, 50])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain.waddr == wgpa(drv, head)[0][0]

    # A zero-length writable descriptor first (address never looked at): skipped.
    buf = drv.alloc(64)
    drv.write_desc(4, 0xDEAD_0000_0000, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 5)
    drv.write_desc(5, buf, 64, VIRTQ_DESC_F_WRITE)
    drv.track(4, [4, 5])
    drv.post(4)
    chain = q.pop()
    assert chain is not None and (chain.waddr, chain.write_len) == (buf, 64)

    # Through an indirect table.
    head = drv.add([b"h" * 12], [200], indirect=True)
    chain = q.pop()
    assert chain is not None and chain.waddr == wgpa(drv, head)[0][0]


def test_chain_waddr_is_minus_one_without_writable_bytes() -> None:
    mem, _ = make_memory(((0, MB),))
    drv = FakeDriver(mem, 16)
    q = drv.queue()
    drv.add([b"only readable"])
    chain = q.pop()
    assert chain is not None and chain.waddr == -1
    drv.write_desc(6, drv.alloc(8), 8, VIRTQ_DESC_F_NEXT, 7)
    drv.write_desc(7, 0x1234, 0, VIRTQ_DESC_F_WRITE)  # writable, but empty
    drv.track(6, [6, 7])
    drv.post(6)
    chain = q.pop()
    assert chain is not None and (chain.waddr, chain.write_len, chain.writable) == (-1, 0, [])
    assert Chain(0, [], [], 0, 0).waddr == -1


# -- no stranded buffers ---------------------------------------------------------------------


@pytest.mark.parametrize("poll_us", [0, 1000])
def test_tx_frames_posted_at_random_intervals_all_reach_the_tap(poll_us: int) -> None:
    rng = random.Random(poll_us + 7)
    # Gaps around the poll window too: the hand-over from busy-polling to kicks is the risk.
    gaps = [0.0, 0.0, 0.00005, 0.0003, 0.0009, 0.0011, 0.002]
    with make_rig(TxLoop, BASE, engine=Engine(poll_us=poll_us), size=256, start=True) as rig:
        frames = [raw_frame(60 + rng.randrange(200), k) for k in range(200)]
        got: list[bytes] = []
        kicks = 0
        for k, frame in enumerate(frames):
            kicks += rig.post_tx(frame)
            if rng.random() < 0.3:
                # Wait for everything posted so far: a frame no kick will ever rescue shows
                # up here rather than being carried out by a later frame's kick.
                while len(got) <= k:
                    try:
                        got.append(rig.tap.read(timeout=2.0)[1])
                    except TimeoutError:
                        pytest.fail(f"poll_us={poll_us}: frame {len(got)} of {k + 1} posted "
                                    f"stranded (avail_event {rig.drv.avail_event()}, "
                                    f"last_avail {rig.loop.q.last_avail_idx})")
            time.sleep(rng.choice(gaps))
        while len(got) < len(frames):
            try:
                got.append(rig.tap.read(timeout=2.0)[1])
            except TimeoutError:
                pytest.fail(f"poll_us={poll_us}: {len(got)} of {len(frames)} frames sent")
        assert got == frames
        wait_for(lambda: rig.drv.used_idx() == len(frames), 2.0, "every TX chain completed")
        assert kicks >= 1
        assert rig.counters["tx_packets"] == len(frames)


def _guest_rx(rig: Rig, count: int, bufsize: int, nbufs: int) -> list[bytes]:
    """A Linux-like RX driver with ``nbufs`` buffers: take used ones, refill, kick if needed,
    re-arm used_event and sleep on the interrupt."""
    drv = rig.drv
    old = drv.avail_idx
    for _ in range(nbufs):
        drv.add(writable=[bufsize], expose=False)
    drv.expose()
    rig.kick_if_needed(old)
    frames: list[bytes] = []
    pending: list[Used] = []
    while len(frames) < count:
        used = drv.get_used()
        if used:
            pending += used
            while pending:
                hdr = VnetHdr.unpack(pending[0].written[:VNET_HDR_LEN])
                if len(pending) < hdr.num_buffers:
                    break
                group, pending = pending[: hdr.num_buffers], pending[hdr.num_buffers :]
                frames.append(b"".join(u.written for u in group)[VNET_HDR_LEN:])
            old = drv.avail_idx
            for _ in used:
                drv.add(writable=[bufsize], expose=False)
            drv.expose()
            rig.kick_if_needed(old)
            continue
        drv.set_used_event(drv.last_used)
        if drv.used_idx() != drv.last_used:
            continue
        if not rig.call_pending(timeout=2.0):
            raise AssertionError(
                f"guest RX stuck after {len(frames)} of {count} frames (avail {drv.avail_idx}, "
                f"last_avail {rig.loop.q.last_avail_idx}, avail_event {drv.avail_event()}, "
                f"used {drv.used_idx()})"
            )
    return frames


@pytest.mark.parametrize("poll_us", [0, 1000])
@pytest.mark.parametrize(("acked", "bufsize", "nbufs"), [(BASE, 1536, 2), (MRG, 512, 4)],
                         ids=["plain", "mrg"])
def test_rx_buffers_running_out_and_refilled_strand_nothing(
    poll_us: int, acked: int, bufsize: int, nbufs: int
) -> None:
    rng = random.Random(poll_us + bufsize)
    frames = [raw_frame(60 + rng.randrange(1440), k) for k in range(200)]
    gaps = [0.0, 0.0, 0.0, 0.0001, 0.0009, 0.0015]
    with make_rig(RxLoop, acked, engine=Engine(poll_us=poll_us), size=64, start=True) as rig:
        def host() -> None:
            for frame in frames:
                rig.tap.inject(frame)
                if rng.random() < 0.5:  # bursts beyond the guest's buffers, then pauses
                    time.sleep(rng.choice(gaps))

        sender = threading.Thread(target=host, daemon=True)
        sender.start()
        try:
            got = _guest_rx(rig, len(frames), bufsize, nbufs)
        finally:
            sender.join(10)
        assert got == frames
        assert rig.counters["rx_packets"] == len(frames)
        assert rig.counters["rx_small_buffer"] == 0


# -- owed TX interrupts ----------------------------------------------------------------------


def _record_used_at_signal(monkeypatch: pytest.MonkeyPatch, drv: FakeDriver) -> list[int]:
    at_signal: list[int] = []
    real = datapath._signal

    def spy(fd: int | None) -> None:
        at_signal.append(drv.used_idx())
        real(fd)

    monkeypatch.setattr(datapath, "_signal", spy)
    return at_signal


def test_tx_interrupt_follows_the_frame_at_once_without_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with make_rig(TxLoop, BASE, engine=Engine(poll_us=0), start=True) as rig:
        assert rig.engine.coalesce_ns == 0
        at_signal = _record_used_at_signal(monkeypatch, rig.drv)
        for k in range(5):
            rig.drv.get_used()
            rig.drv.set_used_event(rig.drv.last_used)  # interrupt me for the next one
            rig.post_tx(raw_frame(80, k))
            assert rig.tap.read(timeout=2.0)[1] == raw_frame(80, k)
            # Nothing else will happen: a held interrupt would never come.
            assert rig.call_pending(timeout=2.0), f"frame {k}: no TX interrupt"
            assert rig.drv.used_idx() == k + 1
        assert at_signal == [1, 2, 3, 4, 5], "interrupt raised before used->idx was published"
        # Counted just after the signal: the guest may wake before the count.
        wait_for(lambda: rig.counters["tx_interrupts"] == 5, 1.0, "five interrupts counted")


def test_tx_interrupt_held_for_coalesce_ns_while_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    poll_us = 200_000
    engine = Engine(poll_us=poll_us)
    assert engine.coalesce_ns == min(poll_us, TX_COALESCE_US) * 1000
    with make_rig(TxLoop, BASE, engine=engine, start=True) as rig:
        at_signal = _record_used_at_signal(monkeypatch, rig.drv)
        t0 = time.monotonic_ns()
        rig.post_tx(raw_frame(80, 0))
        assert rig.tap.read(timeout=2.0)[1] == raw_frame(80, 0)
        assert rig.call_pending(timeout=2.0), "no TX interrupt at all"
        held = time.monotonic_ns() - t0
        assert held >= engine.coalesce_ns, f"interrupt after {held} ns, not held"
        # Held for coalesce_ns, not for the whole poll window.
        assert held < engine.poll_ns * 3 // 4, f"interrupt after {held} ns"
        assert at_signal == [1]


def test_tx_interrupt_dropped_when_used_event_moves_before_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The code's coalesce (250 us) is too short for a test thread to act within; stretch it
    # (still inside the poll window, as the code keeps it) to play a guest's NAPI poll.
    engine = Engine(poll_us=400_000)
    engine.coalesce_ns = 150_000_000
    with make_rig(TxLoop, BASE, engine=engine, start=True) as rig:
        drv = rig.drv
        at_signal = _record_used_at_signal(monkeypatch, drv)
        rig.post_tx(raw_frame(80, 0))
        assert rig.tap.read(timeout=2.0)[1] == raw_frame(80, 0)
        # Published at once, interrupt held.
        wait_for(lambda: drv.used_idx() == 1, 0.1, "frame 0 published")
        assert not rig.call_pending(), "interrupt not held while polling"
        assert rig.call_pending(timeout=2.0), "held interrupt never raised"
        assert at_signal == [1]

        drv.get_used()
        drv.set_used_event(drv.last_used)  # wants an interrupt for the next completion...
        t0 = time.monotonic()
        rig.post_tx(raw_frame(80, 1))
        assert rig.tap.read(timeout=2.0)[1] == raw_frame(80, 1)
        wait_for(lambda: drv.used_idx() == 2, 0.1, "frame 1 published")
        drv.set_used_event(2)  # ...but reclaims it by polling first, and moves on
        assert time.monotonic() - t0 < 0.1, "test too slow to beat the coalesce window"
        assert not rig.call_pending(timeout=0.4 + 0.2), "interrupt raised the guest no longer wants"
        assert at_signal == [1]
        assert rig.counters["tx_interrupts"] == 1


def test_flush_rechecks_needs_interrupt() -> None:
    """The same, step by step without a thread: the owed interrupt is decided at flush."""
    with make_rig(TxLoop, BASE, engine=Engine(poll_us=1000)) as rig:
        drv, loop = rig.drv, rig.loop
        for k in range(3):
            drv.add([PLAIN_HDR + raw_frame(70, k)])
            loop.due = True  # what the engine does when poll reports a kick
            loop.run_once()
            assert loop.owed and drv.used_idx() == k + 1
            assert not rig.call_pending(), "drain raised the owed interrupt itself"
            assert rig.tap.read(timeout=1.0)[1] == raw_frame(70, k)
            drv.get_used()
            if k == 1:
                drv.set_used_event(drv.last_used)  # completion already seen: no interrupt
            else:
                drv.set_used_event(drv.last_used - 1)  # wanted
            loop.flush()
            assert not loop.owed
            assert rig.call_pending() == (k != 1), f"frame {k}"
        assert rig.counters["tx_interrupts"] == 2


# -- busy-polling ----------------------------------------------------------------------------


def test_busy_poll_sends_unkicked_frames_then_rearms_kicks() -> None:
    engine = Engine(poll_us=300_000)
    with make_rig(TxLoop, BASE, engine=engine, start=True) as rig:
        drv, q = rig.drv, rig.loop.q
        wait_for(lambda: engine.thread is not None and rig.loop.flags == 0 and not rig.loop.due,
                 1.0, "the first pass")
        assert rig.post_tx(raw_frame(90, 0)), "an idle device must ask for the first kick"
        t0 = time.monotonic()
        assert rig.tap.read(timeout=2.0)[1] == raw_frame(90, 0)
        # Let the kicked pass end (it re-arms avail_event, and would take a frame posted
        # meanwhile itself): what follows is served by the busy-poll alone.
        wait_for(lambda: drv.avail_event() == 1, 1.0, "the kicked pass to end")
        time.sleep(0.02)
        for k in range(1, 6):
            old = drv.avail_idx
            drv.add([PLAIN_HDR + raw_frame(90, k)])  # no kick, whatever needs_kick says
            assert rig.tap.read(timeout=2.0)[1] == raw_frame(90, k), f"frame {k}"
            # Still in the window: kicks are left off (avail_event lags what was taken).
            assert drv.avail_event() != q.last_avail_idx, f"frame {k}: kicks re-enabled early"
            if k >= 2:
                assert not drv.needs_kick(old), f"frame {k}: the guest would have kicked"
        assert time.monotonic() - t0 < engine.poll_ns / 1e9, "test too slow for the window"
        assert rig.counters["tx_kicks"] <= 1
        # After the window: notifications back on, and a kicked frame goes out again.
        wait_for(lambda: drv.avail_event() == q.last_avail_idx == 6, 2.0,
                 "avail_event re-armed after the poll window")
        time.sleep(0.05)
        assert rig.post_tx(raw_frame(90, 6)), "a sleeping device must ask for a kick"
        assert rig.tap.read(timeout=2.0)[1] == raw_frame(90, 6)
        wait_for(lambda: drv.used_idx() == 7, 1.0, "all completed")


# -- RX interrupt moderation -----------------------------------------------------------------

RX_BUF = 1536  # one plain frame per buffer (MAX_FRAME fits)
T0 = 1_000 * 10**9  # the fake clock's start: long after any last_signal of 0


class FakeClock:
    """Stands in for ``time`` in vionet.datapath: ``monotonic_ns`` moves only when the test
    moves it (or by ``step`` per call), so moderation windows do not depend on the load."""

    def __init__(self, now: int, step: int = 0) -> None:
        self.now = now
        self.step = step

    def monotonic_ns(self) -> int:
        now = self.now
        self.now += self.step
        return now

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(T0)
    monkeypatch.setattr(datapath, "time", fake)
    return fake


class Passes:
    """Counts the engine's passes (each calls the loop's run_once, polling or not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, loop: QueueLoop) -> None:
        self.count = 0
        real = loop.run_once

        def counted(polling: bool = False) -> int:
            self.count += 1
            return real(polling)

        monkeypatch.setattr(loop, "run_once", counted)

    def wait(self, n: int) -> None:
        target = self.count + n
        wait_for(lambda: self.count >= target, 5.0, f"{n} more engine passes")


def _rx_buffers(rig: Rig, n: int) -> None:
    old = rig.drv.avail_idx
    for _ in range(n):
        rig.drv.add(writable=[RX_BUF], expose=False)
    rig.drv.expose()
    rig.kick_if_needed(old)


def _guest_take(rig: Rig) -> list[bytes]:
    """Take the used RX buffers (a frame each), post as many again, and re-arm used_event:
    the guest wants an interrupt for the next frame, not for those it just took."""
    drv = rig.drv
    used = drv.get_used()
    _rx_buffers(rig, len(used))
    drv.set_used_event(drv.last_used)
    assert all(VnetHdr.unpack(u.written[:VNET_HDR_LEN]).num_buffers == 1 for u in used)
    return [u.written[VNET_HDR_LEN:] for u in used]


@pytest.mark.parametrize("quiet_us", [RX_STREAM_US, 5_000_000], ids=["window-end", "5s"])
def test_rx_frame_after_a_quiet_spell_interrupts_at_once(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, quiet_us: int
) -> None:
    with make_rig(RxLoop, BASE, engine=Engine(poll_us=1000)) as rig:
        loop = rx_loop(rig)
        at_signal = _record_used_at_signal(monkeypatch, rig.drv)
        _rx_buffers(rig, 4)
        rig.tap.inject(raw_frame(80, 0))
        run_rx(rig)
        assert rig.call_pending(), "the first frame ever must interrupt at once"
        assert loop.last_signal == T0
        assert _guest_take(rig) == [raw_frame(80, 0)]

        clock.now += quiet_us * 1000  # no RX interrupt for RX_STREAM_US or more
        rig.tap.inject(raw_frame(80, 1))
        run_rx(rig)
        assert rig.call_pending(), "a frame after a quiet spell was not interrupted at once"
        assert not loop.owed
        assert at_signal == [1, 2], "interrupt raised before used->idx was published"
        assert _guest_take(rig) == [raw_frame(80, 1)]
        assert rig.counters["rx_interrupts"] == 2


def _stream_second_frame(rig: Rig, clock: FakeClock, passes: Passes) -> None:
    """Frame 0 interrupts at once; frame 1, 100 us later, is published but its interrupt owed."""
    loop = rx_loop(rig)
    _rx_buffers(rig, 4)
    rig.tap.inject(raw_frame(80, 0))
    assert rig.call_pending(timeout=5.0), "frame 0: no interrupt"
    assert loop.last_signal == T0
    assert _guest_take(rig) == [raw_frame(80, 0)]  # wants an interrupt for frame 1
    # Let frame 0's drain end (it signals before its last readv): frame 1 must be the
    # first of a drain, owed because of the recent interrupt only.
    passes.wait(2)

    clock.now += 100_000  # within RX_STREAM_US of that interrupt: streaming
    rig.tap.inject(raw_frame(80, 1))
    wait_for(lambda: rig.drv.used_idx() == 2, 5.0, "frame 1 published")
    passes.wait(3)  # the engine polls on (the clock stands still) and would flush if due
    assert loop.owed and loop.owed_at == clock.now
    assert not rig.call_pending(), "streaming: the interrupt was not held"


def test_rx_streaming_frame_published_at_once_interrupt_after_coalesce(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    with make_rig(RxLoop, BASE, engine=Engine(poll_us=1000), start=True) as rig:
        loop = rx_loop(rig)
        coalesce = loop.coalesce_ns
        assert coalesce == RX_COALESCE_US * 1000 < rig.engine.poll_ns
        at_signal = _record_used_at_signal(monkeypatch, rig.drv)
        passes = Passes(monkeypatch, loop)
        _stream_second_frame(rig, clock, passes)

        clock.now += coalesce - 1
        passes.wait(3)
        assert not rig.call_pending(), "owed interrupt raised before coalesce_ns"
        assert loop.owed
        clock.now += 1
        assert rig.call_pending(timeout=5.0), "owed interrupt never raised by the engine"
        assert at_signal == [1, 2]
        assert not loop.owed
        assert _guest_take(rig) == [raw_frame(80, 1)]


def test_rx_owed_interrupt_dropped_when_guest_took_the_frame_first(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    with make_rig(RxLoop, BASE, engine=Engine(poll_us=1000), start=True) as rig:
        loop = rx_loop(rig)
        at_signal = _record_used_at_signal(monkeypatch, rig.drv)
        passes = Passes(monkeypatch, loop)
        _stream_second_frame(rig, clock, passes)

        # The guest's NAPI poll takes frame 1 by itself and re-arms used_event past it.
        assert _guest_take(rig) == [raw_frame(80, 1)]
        clock.now += loop.coalesce_ns
        wait_for(lambda: not loop.owed, 5.0, "the engine's flush")
        passes.wait(2)  # flush() clears owed before it decides: let it finish
        assert not rig.call_pending(), "interrupt raised the guest no longer wants"
        assert at_signal == [1]

        # Still streaming (150 us since the last interrupt): the next frame's interrupt,
        # which the guest does want, is held and then raised.
        rig.tap.inject(raw_frame(80, 2))
        wait_for(lambda: rig.drv.used_idx() == 3, 5.0, "frame 2 published")
        passes.wait(3)
        assert loop.owed and not rig.call_pending()
        clock.now += loop.coalesce_ns
        assert rig.call_pending(timeout=5.0), "frame 2: owed interrupt never raised"
        assert at_signal == [1, 3]
        # Counted just after the signal: the guest may wake before the count.
        wait_for(lambda: rig.counters["rx_interrupts"] == 2, 5.0, "two interrupts counted")


def test_rx_without_polling_is_not_moderated(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    with make_rig(RxLoop, BASE, engine=Engine(poll_us=0)) as rig:
        loop = rx_loop(rig)
        assert loop.coalesce_ns == 0
        drv = rig.drv
        at_signal = _record_used_at_signal(monkeypatch, drv)
        _rx_buffers(rig, 8)
        # The clock stands still: each interrupt follows the previous one 0 ns later.
        for k in range(4):
            rig.tap.inject(raw_frame(80, k))
            run_rx(rig)
            assert rig.call_pending(), f"frame {k}: not interrupted at once"
            assert not loop.owed
            assert _guest_take(rig) == [raw_frame(80, k)]
        assert at_signal == [1, 2, 3, 4]
        assert loop.last_signal == T0

        # A drain of three where the guest wants its interrupt at the second frame: raised
        # within the pass, nothing left owed.
        drv.set_used_event(drv.last_used + 1)
        frames = [raw_frame(90, k) for k in range(3)]
        for f in frames:
            rig.tap.inject(f)
        run_rx(rig)
        assert rig.call_pending(), "a later frame's interrupt was not raised in the pass"
        assert not loop.owed
        assert at_signal == [1, 2, 3, 4, 6]
        assert _guest_take(rig) == frames
        assert rig.counters["rx_interrupts"] == 5


def test_rx_long_drain_raises_the_owed_interrupt_inside_the_drain(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    step = 10_000
    n = 40
    with make_rig(RxLoop, BASE, engine=Engine(poll_us=1000)) as rig:
        loop = rx_loop(rig)
        drv = rig.drv
        coalesce = loop.coalesce_ns
        assert loop.budget > n
        _rx_buffers(rig, n)
        run_rx(rig)  # tap empty: the loop only stashes a buffer
        frames = [raw_frame(60 + k, k) for k in range(n)]
        for f in frames:
            rig.tap.inject(f)
        loop.last_signal = clock.now  # an interrupt just now: frames are streaming
        clock.step = step  # from here on the clock moves 10 us per look

        signals: list[tuple[int, int]] = []  # (used idx, ns since owed) per interrupt
        real = datapath._signal

        def guest_irq(fd: int | None) -> None:
            signals.append((drv.used_idx(), clock.now - loop.owed_at))
            drv.set_used_event(drv.used_idx())  # the handler asks for the next frame too
            real(fd)

        monkeypatch.setattr(datapath, "_signal", guest_irq)
        run_rx(rig)
        assert drv.used_idx() == n
        assert signals, "no interrupt raised during the drain"
        assert signals[0][0] < n // 2, f"first interrupt only at used idx {signals[0][0]}"
        used_at = [u for u, _ in signals]
        assert used_at == sorted(set(used_at))
        assert 2 <= len(signals) < n // 2, f"not moderated: {len(signals)} interrupts"
        for used, waited in signals:
            # Due after coalesce_ns, and raised then, within a frame or two.
            assert coalesce <= waited < 2 * coalesce, f"at used idx {used}: {waited} ns"
        assert rig.call_pending()
        assert _guest_take(rig) == frames
        assert rig.counters["rx_interrupts"] == len(signals)


def test_engine_close_frees_its_eventfd_now_or_when_its_thread_ends() -> None:
    idle = Engine()
    fd = idle._ctl
    os.fstat(fd)
    idle.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    idle.wake()  # after close: a no-op, not an error


def test_engine_closed_while_running_frees_its_eventfd_when_the_thread_ends() -> None:
    with make_rig(TxLoop, BASE, start=True) as rig:
        fd = rig.engine._ctl
        rig.engine.close()
        os.fstat(fd)  # still open: the thread serves the loop and polls it
        thread = rig.engine.thread
        assert thread is not None
        rig.loop.stop()
        thread.join(5)
        assert not thread.is_alive()
        with pytest.raises(OSError):
            os.fstat(fd)
