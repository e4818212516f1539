"""The packet loops: TX (guest -> tap) and RX (tap -> guest), served by one engine thread.

A device's :class:`Engine` waits once (one poll over both kick eventfds and the tap), then
each loop drains as much as it can, publishing used entries as it goes and raising the
guest's interrupt when the guest wants one, moderated while frames stream in: waiting on the
event loop before every frame costs about 3x. Frames move with writev/readv directly between
the tap and guest memory; the only copy is the 12-byte header on TX.

Per-NIC rules (:class:`LinkRules`) add what vmd's vionet does beyond moving frames: with
``locked lladdr`` TX drops frames not from the VM's MAC and RX passes only unicast to it plus
broadcast/multicast (one comparison on a view, no copy); on a ``local interface`` TX hands DHCP
requests to the responder instead of the tap, and RX copies the replies (the copy path, an
:class:`InjectQueue`) into the guest's buffers between frames from the tap.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vionet import csum, dhcp, vnethdr
from vionet.counters import Counters
from vionet.guestmem import GuestMemoryError
from vionet.virtqueue import Chain, ChainError, RingError, SplitQueue
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF, VnetGso, VnetHdrFlags

log = logging.getLogger("vionet.datapath")

BATCH = 64  # packets between used-ring publications (and interrupts) while draining
# RX interrupt moderation while frames stream in (the last interrupt less than RX_STREAM_US
# ago): frames are published at once, the interrupt follows RX_COALESCE_US later.
RX_STREAM_US = 300
RX_COALESCE_US = 50
IOV_MAX = 1024
MAX_GSO_FRAME = 65535 + 14 + 4  # tun never hands more than a 64 KiB IP packet plus L2
MAX_PLAIN_FRAME = 1514 + 4 + 4  # MTU 1500 + Ethernet + VLAN + slack
INJECT_QUEUE_MAX = 16  # replies waiting for RX buffers; a guest that posts none loses the rest
BAD_SOURCE_LOG_INTERVAL = 1.0  # seconds between "bad source address" lines
# The header of an injected frame: no flags (its checksums are complete), num_buffers 1.
INJECT_HDR = bytes(10) + b"\x01\x00"
_PLAIN = vnethdr.PLAIN  # validate_tx's verdict for a frame that needs nothing done
_PLAIN_HDR = vnethdr.for_tap(_PLAIN)


def _signal(fd: int | None) -> None:
    if fd is not None:
        # Not contextlib.suppress: per interrupt, on the latency path, its two extra calls
        # cost microseconds with cold caches.
        try:  # noqa: SIM105
            os.eventfd_write(fd, 1)
        except OSError:  # QEMU gone or the fd replaced: nothing to tell
            pass


def _drain_eventfd(fd: int) -> int:
    """Consume an eventfd's count (0 if it was not signalled)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except (BlockingIOError, InterruptedError):
        return 0


def _head(iov: Sequence[memoryview], n: int) -> bytes:
    """Up to ``n`` leading bytes of ``iov`` (fewer if it is shorter), however it is split."""
    parts: list[bytes] = []
    for v in iov:
        if n <= 0:
            break
        parts.append(bytes(v[:n]))
        n -= len(v)
    return b"".join(parts)


class InjectQueue:
    """Frames vionet itself sends the guest (DHCP replies), waiting for the RX loop.

    Filled by the TX thread, emptied by the RX thread (deque append/popleft are atomic); bounded,
    and it outlives RX loop restarts so a reply made while the ring was stopped still goes out.
    """

    def __init__(self, counters: Counters, wake: Callable[[], None] = lambda: None) -> None:
        # Public so the RX loop can test it for emptiness without a call per frame.
        self.frames: collections.deque[bytes] = collections.deque()
        self.counters = counters
        self.wake = wake

    def put(self, frame: bytes) -> None:
        if len(self.frames) >= INJECT_QUEUE_MAX:
            self.counters.inc("rx_drop_inject_overflow")
            return
        self.frames.append(frame)
        self.wake()

    def __len__(self) -> int:
        return len(self.frames)

    def clear(self) -> None:
        self.frames.clear()


@dataclass
class LinkRules:
    """What a NIC's loops enforce or answer besides moving frames; all off by default."""

    locked_mac: bytes | None = None  # locked lladdr: the VM's MAC, else None
    dhcp: dhcp.DhcpResponder | None = None  # local interface: answers the guest's DHCP
    injected: InjectQueue | None = None  # the copy path into RX


WANT_TAP = 1  # service(): watch the tap for this loop
BUSY = 2  # service(): work is left (budget used up); poll without sleeping
# How long the engine keeps polling (rings and tap, without sleeping) after the last frame
# moved. Under TCG a guest answers in 0.3-0.7 ms; an engine that slept meanwhile wakes with
# cold caches, and a Python pass then costs 5-10x a warm one (see docs/performance.md).
DEFAULT_POLL_US = 1000  # vm.conf "poll" (vmd_py.config.model has the same default)
MAX_POLL_US = 1_000_000
TX_COALESCE_US = 250


class Engine:
    """One thread serving every running queue of a device from a single poll.

    A request/response (a guest's ping, a TCP ACK) crosses TX and RX: in one thread that is one
    wake-up and no GIL hand-off between two threads, and a frame the tap answers right away is
    picked up on the same pass. The thread exists while at least one queue runs.
    """

    def __init__(self, name: str = "vionet-io", poll_us: int = DEFAULT_POLL_US) -> None:
        self.name = name
        self.poll_ns = max(0, poll_us) * 1000
        # While polling, a TX completion's interrupt may wait this long: if the guest's RX
        # NAPI poll reclaims the buffers first (Linux does, when an answer arrives meanwhile),
        # the interrupt is no longer wanted and the guest handles one interrupt, not two.
        self.coalesce_ns = min(self.poll_ns, TX_COALESCE_US * 1000)
        self._ctl = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._ops: list[tuple[bool, QueueLoop, threading.Event]] = []
        self._closing = False
        self._loops: list[QueueLoop] = []  # touched by the engine thread only
        self.thread: threading.Thread | None = None
        # Whether the tap may hold a frame: poll said so, TX just wrote one (the host may have
        # answered it already), or RX stopped before EAGAIN. RX clears it on EAGAIN; a wrong
        # False costs nothing but a pass, since the tap is polled (level-triggered) meanwhile.
        self.tap_ready = True

    def add(self, loop: QueueLoop) -> None:
        with self._lock:
            self._ops.append((True, loop, threading.Event()))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
        self.wake()

    def remove(self, loop: QueueLoop) -> None:
        """Take a loop out and wait until the engine has let go of it (and finished it)."""
        done = threading.Event()
        with self._lock:
            running = self.thread is not None
            if running:
                self._ops.append((False, loop, done))
        if running:
            self.wake()
            done.wait()
        else:
            loop.finish()

    def wake(self) -> None:
        with self._lock:
            if self._ctl >= 0:
                os.eventfd_write(self._ctl, 1)

    def close(self) -> None:
        """Free the control eventfd (now, or when the thread ends if loops still run)."""
        with self._lock:
            self._closing = True
            if self.thread is None and self._ctl >= 0:
                os.close(self._ctl)
                self._ctl = -1

    def _apply(self) -> bool:
        """Take pending add/remove requests; False (thread ends) once no loop is left."""
        with self._lock:
            ops, self._ops = self._ops, []
            for add, loop, done in ops:
                if add:
                    self._loops.append(loop)
                    self.tap_ready = True  # frames may have queued while no loop ran
                    continue
                if loop in self._loops:
                    self._loops.remove(loop)
                loop.finish()
                done.set()
            # TX before RX in a pass: a frame TX writes may be answered by the host at once
            # (a ping, an ACK), and RX then picks the answer up in the same pass.
            self._loops.sort(key=lambda loop: loop.order)
            if not self._loops:
                self.thread = None  # under the lock: add() starts a new thread from here on
                if self._closing and self._ctl >= 0:
                    os.close(self._ctl)
                    self._ctl = -1
                return False
            return True

    def _run(self) -> None:
        # Per pass, with cold caches (a TCG guest evicts them between packets) every syscall
        # costs 10-40 us: only eventfds that poll reported are read, a loop runs only when it
        # may have work (kicked, tap readable, work left over, or busy-polling), the tap is read
        # only when it can have a frame (see tap_ready), and registrations change only when
        # they must.
        poller = select.poll()
        poller.register(self._ctl, select.POLLIN)
        kicks: dict[int, QueueLoop] = {}
        tap_watched = -1
        polling = False
        deadline = 0
        while True:
            if self._ops:
                if not self._apply():
                    return
                for fd in kicks:
                    poller.unregister(fd)
                kicks = {loop.kick_fd: loop for loop in self._loops}
                for fd in kicks:
                    poller.register(fd, select.POLLIN)
            want_tap = -1
            busy = worked = False
            loops = self._loops
            for loop in loops:
                flags = loop.run_once(polling)
                if flags < 0:
                    loops.remove(loop)  # its ring broke; it waits for remove()
                    break  # the list changed under the for: the next pass serves the rest
                if flags & WANT_TAP:
                    want_tap = loop.tap_fd
                if flags & BUSY:
                    busy = True
                if loop.worked:
                    loop.worked = False
                    worked = True
            for loop in loops:
                if loop.unsettled:
                    flags = loop.settle_once(polling)
                    if flags < 0:
                        loops.remove(loop)
                        break
                    if flags & BUSY:
                        busy = True
            if want_tap != tap_watched:
                if tap_watched >= 0:
                    poller.unregister(tap_watched)
                if want_tap >= 0:
                    poller.register(want_tap, select.POLLIN)
                tap_watched = want_tap
            timeout: int | None = None
            now = 0
            if self.poll_ns:
                now = time.monotonic_ns()
                if worked:
                    deadline = now + self.poll_ns
            if busy:
                timeout = 0
            elif now < deadline:
                polling = True
                timeout = 0
                # Give the core to anything runnable here (QEMU's main loop injecting the
                # interrupt we just raised, the vCPU): polling must not delay them.
                os.sched_yield()
            elif polling:
                # Leaving the busy-poll: one more pass in which the loops ask for kicks again
                # (and re-check their rings) before the engine sleeps.
                polling = False
                for loop in loops:
                    loop.due = True
                continue
            for loop in loops:
                if loop.owed and (
                    timeout is None or not self.poll_ns or now - loop.owed_at >= loop.coalesce_ns
                ):
                    loop.flush()
            for fd, _events in poller.poll(timeout):
                if fd == tap_watched:
                    self.tap_ready = True
                elif fd == self._ctl:
                    _drain_eventfd(fd)
                    for loop in loops:
                        loop.due = True  # a new loop, a pause change, a frame to inject
                else:
                    kicked = kicks.get(fd)
                    if kicked is None or kicked.dead:
                        _drain_eventfd(fd)
                    else:
                        # The loop reads its eventfd itself, after it has moved what is
                        # already there: TX writes the guest's frame out first.
                        kicked.due = kicked.kicked = True


class QueueLoop:
    """One virtqueue's packet work, run by its device's :class:`Engine`."""

    name = "queue"
    order = 0  # position in the engine's pass
    budget = 256  # frames per pass before the other queue gets its turn

    def __init__(
        self,
        queue: SplitQueue,
        kick_fd: int,
        call_fd: int | None,
        tap_fd: int,
        acked: int,
        counters: Counters,
        on_ring_error: Callable[[str], None],
        rules: LinkRules | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.q = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.tap_fd = tap_fd
        self.acked = acked
        self.counters = counters
        self.on_ring_error = on_ring_error
        self.paused = threading.Event()
        rules = rules or LinkRules()
        self.locked_mac = rules.locked_mac
        self.dhcp = rules.dhcp
        self.injected = rules.injected
        self.engine = engine or Engine(self.name)
        self.dead = False
        self.due = True  # serve on the next pass: kicked, woken, or work was left over
        self.flags = 0  # what service() last returned (a loop not served keeps its wishes)
        self.worked = False  # a frame moved since the engine last looked
        self.owed = False  # completions published whose interrupt may wait (coalesce_ns)
        self.owed_at = 0  # monotonic ns when owed became True
        self.last_signal = 0  # monotonic ns of the last interrupt raised
        self.kicked = False  # poll saw the kick eventfd readable; take_kick() resets it
        self.unsettled = False  # service() left work for settle() at the end of the pass
        # Notification counts: how well kick and interrupt suppression work (vmctl status -v).
        prefix = "tx" if self.name == "vionet-tx" else "rx"
        self._irq_counter = f"{prefix}_interrupts"
        self.kick_counter = f"{prefix}_kicks"

    def start(self) -> None:
        self.engine.add(self)

    def stop(self) -> None:
        """Stop serving; afterwards ``q.last_avail_idx`` is final (for GET_VRING_BASE)."""
        self.engine.remove(self)

    def wake(self) -> None:
        self.engine.wake()

    def finish(self) -> None:
        """Called once when the engine lets go of the loop."""

    def run_once(self, polling: bool = False) -> int:
        """One pass (in the engine thread): WANT_TAP/BUSY flags, or -1 if the ring broke.

        ``polling``: the engine is busy-polling, so look at the ring even without a kick and
        leave kicks off (no guest exits) until it stops.
        """
        if not (self.due or polling or self.ready()):
            return self.flags
        self.due = False
        if self.paused.is_set():
            self.take_kick()
            self.flags = 0
            return 0
        return self._guarded(self.service, polling)

    def settle_once(self, polling: bool) -> int:
        """The second half of a pass, after every loop's service(): see :meth:`settle`."""
        self.unsettled = False
        return self._guarded(self.settle, polling)

    def _guarded(self, step: Callable[[bool], int], polling: bool) -> int:
        try:
            flags = step(polling)
        except RingError as exc:
            self.counters.inc(f"ring_error_{exc.reason}")
            log.error("%s: ring broken (%s): device needs reset", self.name, exc)
            self.on_ring_error(str(exc))
        except Exception:  # never let the engine die: every queue would just stop
            log.exception("%s: loop failed", self.name)
            self.counters.inc("loop_crash")
            self.on_ring_error("internal error")
        else:
            if flags & BUSY:
                self.due = True
            self.flags = flags
            return flags
        self.dead = True
        return -1

    def ready(self) -> bool:
        """Whether there may be work without a kick (beyond ``due``)."""
        return False

    def take_kick(self) -> None:
        """Reset the kick eventfd if poll reported it. Must come before the ring's last check
        before sleeping: a kick consumed after that check could strand a buffer for good."""
        if self.kicked:
            self.kicked = False
            if _drain_eventfd(self.kick_fd):
                self.counters.inc(self.kick_counter)

    @property
    def coalesce_ns(self) -> int:
        """How long an owed interrupt may wait while the engine polls."""
        return self.engine.coalesce_ns

    def owe(self) -> None:
        """Published completions whose interrupt the engine raises later (flush)."""
        if not self.owed:
            self.owed = True
            self.owed_at = time.monotonic_ns()

    def flush(self) -> None:
        """Raise the interrupt owed for completions published earlier in the pass."""
        self.owed = False
        self._notify()

    def _signal(self) -> None:
        # Bookkeeping first: whoever the eventfd wakes (tests included) sees it done.
        self.last_signal = time.monotonic_ns()
        self.counters.inc(self._irq_counter)
        _signal(self.call_fd)

    def service(self, polling: bool) -> int:
        raise NotImplementedError

    def settle(self, polling: bool) -> int:
        """Run after every loop's service() in a pass when service() set ``unsettled``."""
        return self.flags

    def _interrupt(self) -> bool:
        """Publish, and signal the guest if it wants it; whether it was signalled."""
        self.q.publish()
        return self._notify()

    def _notify(self) -> bool:
        """Signal the guest if it wants an interrupt for what is published; whether it did."""
        if self.q.needs_interrupt():
            self._signal()
            return True
        return False


class TxLoop(QueueLoop):
    """Guest -> tap: validate each frame's vnet header, writev it to the tap."""

    name = "vionet-tx"
    _bad_source_logged = -BAD_SOURCE_LOG_INTERVAL
    _bad_source_since_log = 0

    def service(self, polling: bool) -> int:
        # No kicks while we are draining (or the engine polls) anyway: each one is a guest
        # exit, costly under TCG. Resetting the kick eventfd and asking for kicks again wait
        # for settle(), after RX has had its turn: the host's answer to what we just sent
        # (a ping reply, an ACK) goes to the guest before those syscalls.
        self.q.disable_notifications()
        if not self.drain():
            self.take_kick()
            return BUSY
        self.unsettled = True
        return 0

    def settle(self, polling: bool) -> int:
        # The kick is consumed before the last look at the ring: a frame made available
        # before any kick we swallow here is seen below, so none is left waiting.
        self.take_kick()
        if polling:
            return 0
        q = self.q
        while q.enable_notifications():
            q.disable_notifications()
            if not self.drain():
                return BUSY
        return 0

    def drain(self) -> bool:
        """Send what the guest queued; False if the budget ran out first.

        Completions are published as they go, but the interrupt for the last batch is owed:
        the engine raises it after RX has had its turn (an answer the host gave at once, a
        ping reply or an ACK, reaches the guest first) and, while it busy-polls, only after
        ``Engine.coalesce_ns``, when the guest has often reclaimed the buffers by itself.
        """
        q = self.q
        pending = 0
        budget = self.budget
        while True:
            budget -= 1
            if budget < 0:
                break
            try:
                chain = q.pop()
            except ChainError as exc:
                self.counters.inc(f"tx_drop_{exc.reason}")
                q.push(exc.head, 0)
                pending += 1
                continue
            if chain is None:
                break
            self._send(chain)
            q.push(chain.head, 0)
            pending += 1
            if pending >= BATCH:
                self._interrupt()
                pending = 0
        if pending:
            q.publish()
            self.owe()
            self.worked = True
        return budget >= 0

    def _send(self, chain: Chain) -> None:
        """Validate and write one frame to the tap (or count why not)."""
        if chain.writable:
            self.counters.inc("tx_drop_writable_descriptor")
            return
        iov = chain.readable
        # The common layout (Linux pushes the header in front of the frame, one buffer) takes
        # no helper calls: with cold caches each costs microseconds on the latency path.
        fast = bool(iov) and len(iov[0]) > VNET_HDR_LEN
        try:
            raw = bytes(iov[0][:VNET_HDR_LEN]) if fast else vnethdr.gather(iov)
        except vnethdr.HeaderError:
            self.counters.inc("tx_drop_short_header")
            return
        frame_len = chain.read_len - VNET_HDR_LEN
        verdict = vnethdr.validate_tx(raw, frame_len, self.acked)
        if isinstance(verdict, vnethdr.DropReason):
            self.counters.inc(f"tx_drop_{verdict.value}")
            return
        # Zero-length descriptors never become views, so only the first view is cut.
        frame = [iov[0][VNET_HDR_LEN:], *iov[1:]] if fast else vnethdr.skip(iov, VNET_HDR_LEN)
        if self.locked_mac is not None:
            first = frame[0] if frame else b""
            src = first[6:12] if len(first) >= 12 else _head(frame, 12)[6:12]
            if src != self.locked_mac:
                self._bad_source(bytes(src))
                return
        if self.dhcp is not None and dhcp.is_server_bound(_head(frame, dhcp.peek_len())):
            # Ours to answer, valid or not: a local interface's DHCP never reaches the tap.
            reply = self.dhcp.answer(_head(frame, dhcp.MAX_FRAME + 1))
            if reply is not None and self.injected is not None:
                self.injected.put(reply)
            return
        tap_hdr = _PLAIN_HDR if verdict is _PLAIN else vnethdr.for_tap(verdict)
        out: list[bytes | memoryview] = [tap_hdr, *frame]
        if len(out) > IOV_MAX:
            self.counters.inc("tx_drop_too_many_segments")
            return
        try:
            os.writev(self.tap_fd, out)
        except OSError as exc:
            self.counters.inc(f"tx_drop_tap_{errno.errorcode.get(exc.errno or 0, 'error')}")
            return
        self.engine.tap_ready = True
        self.counters.add("tx_packets", 1)
        self.counters.add("tx_bytes", frame_len)

    def _bad_source(self, src: bytes) -> None:
        self.counters.inc("tx_drop_bad_source_address")
        self._bad_source_since_log += 1
        now = time.monotonic()
        if now - self._bad_source_logged >= BAD_SOURCE_LOG_INTERVAL:
            # A guest can send these at line rate: at most one line a second.
            log.warning(
                "bad source address %s (%d frame(s) dropped since the last report)",
                src.hex(":") if src else "(none)", self._bad_source_since_log,
            )
            self._bad_source_logged = now
            self._bad_source_since_log = 0


class RxLoop(QueueLoop):
    """Tap -> guest: readv each frame straight into the guest's posted buffers.

    Buffers are popped ahead into a stash big enough for the largest frame the tap may hand us
    (one chain without MRG_RXBUF; as many as it takes with it) and stay there until a frame
    fills them, so no chain is walked twice. The stash is always the most recent pops, so when
    the queue stops it is given back with ``unpop`` and ``last_avail_idx`` stays exact.
    """

    name = "vionet-rx"
    order = 1

    @property
    def coalesce_ns(self) -> int:
        return min(self.engine.poll_ns, RX_COALESCE_US * 1000)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mrg = bool(self.acked & NetF.MRG_RXBUF)
        self.guest_csum = bool(self.acked & NetF.GUEST_CSUM)
        self.guest_gso_types = {
            gso for gso, feature in _GUEST_GSO.items() if self.acked & feature
        } if self.guest_csum else set()
        self.guest_ecn = bool(self.acked & NetF.GUEST_ECN)
        self.max_frame = VNET_HDR_LEN + (
            MAX_GSO_FRAME if self.guest_gso_types else MAX_PLAIN_FRAME
        )
        self.tap_mask = 0  # what the parent confirmed; only used to report surprises
        self._stash: collections.deque[Chain] = collections.deque()
        # The stash's writable bytes as the readv iov, kept up to date as chains come and go
        # rather than rebuilt per frame. Buffers that are adjacent in guest memory (Linux
        # carves mergeable buffers one after another out of 32 KiB pages) share one view:
        # readv's cost is mostly per iovec, ~1 us each with cold caches. _tail is the GPA just
        # past the last view when that view is one guest-contiguous range, else -1.
        self._views: list[memoryview] = []
        self._tail = -1
        self._room = 0
        empty: collections.deque[bytes] = collections.deque()
        self._injected = self.injected.frames if self.injected is not None else empty

    def finish(self) -> None:
        # Popped but unused buffers go back to the ring: GET_VRING_BASE must not count them.
        if self._stash and self.q.broken is None:
            self.q.unpop(len(self._stash))
        self._stash.clear()
        self._views.clear()
        self._tail = -1
        self._room = 0

    def ready(self) -> bool:
        return self.engine.tap_ready or bool(self._injected)

    def service(self, polling: bool) -> int:
        q = self.q
        self.take_kick()
        while True:
            have_buffers = self.drain()
            if have_buffers is None:
                return WANT_TAP | BUSY  # budget used up: the tap may hold more
            # Kicks only matter when we ran out of buffers: while we have some, the guest
            # refilling the ring need not exit to tell us. Out of buffers, ask for the next kick
            # and re-check, so buffers posted in between are not missed (unless the engine is
            # polling the ring anyway). Watch the tap only while there are buffers: otherwise
            # frames wait in the tap's queue.
            if have_buffers:
                q.disable_notifications()
                return WANT_TAP
            if polling or not q.enable_notifications():
                return 0

    def _discard_stash(self) -> None:
        """Complete every stashed buffer empty (needed before completing a later-popped one)."""
        while self._stash:
            self.q.push(self._stash.popleft().head, 0)
        self._views.clear()
        self._tail = -1
        self._room = 0

    def _fill(self) -> bool:
        """Top the stash up to one full frame's worth; False if the guest has not posted it."""
        need = self.max_frame if self.mrg else 1
        while self._room < need if self.mrg else not self._stash:
            try:
                chain = self.q.pop()
            except ChainError as exc:
                self.counters.inc(f"rx_drop_{exc.reason}")
                self._discard_stash()
                self.q.push(exc.head, 0)
                continue
            if chain is None:
                return False
            if chain.readable or not chain.writable:
                self.counters.inc("rx_drop_readable_descriptor")
                self._discard_stash()
                self.q.push(chain.head, 0)
                continue
            if not self.mrg and chain.write_len < self.max_frame:
                # Without MRG_RXBUF every buffer must hold a whole frame; a smaller one would
                # truncate it. Count it; the frame may still fit.
                self.counters.inc("rx_small_buffer")
            self._stash.append(chain)
            self._room += chain.write_len
            self._add_views(chain)
        return True

    def _add_views(self, chain: Chain) -> None:
        views = self._views
        if len(chain.writable) != 1:
            views += chain.writable
            self._tail = -1
            return
        if chain.waddr == self._tail and views:
            last = views[-1]
            try:
                views[-1] = self.q.mem.gpa(self._tail - len(last), len(last) + chain.write_len)
            except GuestMemoryError:  # adjacent, but in the next region
                views.append(chain.writable[0])
        else:
            views.append(chain.writable[0])
        self._tail = chain.waddr + chain.write_len

    def _trim_views(self, nbytes: int) -> None:
        """Drop the first ``nbytes`` of the iov (the buffers of chains just completed)."""
        views = self._views
        k = 0
        while nbytes > 0:
            first = views[k]
            if len(first) > nbytes:
                views[k] = first[nbytes:]
                break
            nbytes -= len(first)
            k += 1
        del views[:k]
        if not views:
            self._tail = -1

    def drain(self) -> bool | None:
        """Move frames until the tap is empty (True), the guest is out of buffers (False) or
        the budget is used up (None).

        Every frame is published at once (a guest polling its ring takes it). The first of
        a drain raises the interrupt straight away if the guest wants one, unless frames are
        streaming in (the last interrupt less than RX_STREAM_US ago); every other interrupt
        is owed and raised RX_COALESCE_US later (the engine's flush, or here in a long
        drain): interrupt moderation, as a NIC does, so the guest's NAPI takes frames in
        batches instead of re-arming per frame.
        """
        engine = self.engine
        budget = self.budget
        first = True
        while True:
            budget -= 1
            if budget < 0:
                engine.tap_ready = True
                return None
            if not self._fill():
                engine.tap_ready = True  # frames may queue while we wait for buffers
                return False
            iov = self._views if len(self._views) <= IOV_MAX else self._views[:IOV_MAX]
            if self._injected:  # only the RX thread takes from it: popleft cannot fail
                n = self._copy_in(iov, self._injected.popleft())
                if not n:
                    continue
            else:
                if not engine.tap_ready:
                    return True
                try:
                    n = os.readv(self.tap_fd, iov)
                except BlockingIOError:
                    engine.tap_ready = False
                    return True
                except OSError as exc:
                    self.counters.inc(
                        f"rx_tap_{errno.errorcode.get(exc.errno or 0, 'error')}"
                    )
                    return True
                if self.locked_mac is not None and not self._for_us(iov, n):
                    self.counters.inc("rx_drop_locked_destination")
                    continue
                if not self._fixup(iov, n):
                    continue  # dropped: the same buffers take the next frame
            self._complete(n)
            self.worked = True
            if first and not self._streaming():
                if self._interrupt():
                    # QEMU's main loop, which turns the signal into the guest's
                    # interrupt, may be queued on this core: let it run first.
                    os.sched_yield()
            else:
                self.q.publish()
                self.owe()
                if time.monotonic_ns() - self.owed_at >= self.coalesce_ns:
                    self.flush()  # a long drain: the guest must not wait for its end
            first = False

    def _streaming(self) -> bool:
        """Frames keep coming (the last interrupt was recent): moderate, as a NIC would."""
        return bool(self.engine.poll_ns) and (
            time.monotonic_ns() - self.last_signal < RX_STREAM_US * 1000
        )

    def _for_us(self, iov: list[memoryview], n: int) -> bool:
        """locked lladdr: unicast to the VM's MAC, or any broadcast/multicast."""
        if n < VNET_HDR_LEN + 6:
            return True  # a runt: _fixup drops and counts it
        first = iov[0]
        dst = first[12:18] if len(first) >= VNET_HDR_LEN + 6 else _head(iov, 18)[12:]
        return bool(dst[0] & 1) or dst == self.locked_mac

    def _copy_in(self, iov: list[memoryview], frame: bytes) -> int:
        """Copy an injected frame (with its header) into the buffers; its length, or 0."""
        data = INJECT_HDR + frame
        room = sum(len(v) for v in iov)
        if len(data) > room:
            self.counters.inc("rx_drop_inject_too_big")
            return 0
        vnethdr.scatter(iov, 0, data)
        self.counters.inc("rx_injected")
        return len(data)

    def _fixup(self, iov: list[memoryview], n: int) -> bool:
        """Make the header the tap wrote right for this guest; False to drop the frame."""
        if n < VNET_HDR_LEN + 14:
            self.counters.inc("rx_drop_runt")
            return False
        first = iov[0]
        raw = bytes(first[:VNET_HDR_LEN]) if len(first) >= VNET_HDR_LEN else vnethdr.gather(iov)
        flags, gso = raw[0], raw[1]
        if gso == 0:
            if flags == 0 or (self.guest_csum and flags in _CSUM_FLAGS_OK):
                return True  # the common case: as the tap wrote it
        elif (
            flags == VnetHdrFlags.NEEDS_CSUM
            and gso & ~VnetGso.ECN in self.guest_gso_types
            and (self.guest_ecn or not gso & VnetGso.ECN)
        ):
            return True
        frame = _clip(vnethdr.skip(iov, VNET_HDR_LEN), n - VNET_HDR_LEN)
        verdict = vnethdr.validate_rx_from_tap(raw, frame, self.acked, self.tap_mask)
        if verdict.beyond_tap_mask:
            self.counters.inc("rx_beyond_tap_mask")
        if verdict.action is vnethdr.RxAction.SOFT_CSUM:
            # The tap's offsets: the header the guest gets (verdict.hdr) has them zeroed.
            tap_hdr = vnethdr.VnetHdr.unpack(raw)
            if not csum.complete(frame, n - VNET_HDR_LEN, tap_hdr.csum_start,
                                 tap_hdr.csum_offset):
                self.counters.inc("rx_drop_bad_csum_offsets")
                return False
            self.counters.inc("rx_csum_completed")
        elif verdict.action is not vnethdr.RxAction.DELIVER:
            reason = verdict.drop.value if verdict.drop else verdict.action.value
            self.counters.inc(f"rx_drop_{reason}")
            return False
        vnethdr.scatter(iov, 0, vnethdr.for_guest(verdict.hdr, 1)[:10])
        return True

    def _complete(self, n: int) -> None:
        """Push the stashed chains the frame filled; set num_buffers."""
        stash = self._stash
        first = stash[0]
        left = n
        used = 0
        consumed = 0
        push = self.q.push
        while left > 0:
            chain = stash.popleft()
            take = min(left, chain.write_len)
            consumed += chain.write_len
            push(chain.head, take)
            used += 1
            left -= take
            if not self.mrg:
                break
        self._room -= consumed
        self._trim_views(consumed)
        head = first.writable[0]
        count = used if self.mrg else 1
        if len(head) >= VNET_HDR_LEN:
            head[10:12] = count.to_bytes(2, "little")
        else:
            vnethdr.write_num_buffers(first.writable, count)
        self.counters.add("rx_packets", 1)
        self.counters.add("rx_bytes", n - VNET_HDR_LEN)


_GUEST_GSO = {
    int(VnetGso.TCPV4): int(NetF.GUEST_TSO4),
    int(VnetGso.TCPV6): int(NetF.GUEST_TSO6),
    int(VnetGso.UDP): int(NetF.GUEST_UFO),
}
_CSUM_FLAGS_OK = (int(VnetHdrFlags.NEEDS_CSUM), int(VnetHdrFlags.DATA_VALID))


def _clip(iov: list[memoryview], length: int) -> list[memoryview]:
    out: list[memoryview] = []
    for view in iov:
        if length <= 0:
            break
        out.append(view[:length])
        length -= len(view)
    return out
