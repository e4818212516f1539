"""The packet loops: TX (guest -> tap) and RX (tap -> guest), one thread each per queue pair.

Each loop waits once (poll on its eventfd and/or the tap), then drains as much as it can,
publishing used entries and raising the guest's interrupt once per batch rather than per packet:
waiting on the event loop before every frame costs about 3x. Frames move with writev/readv
directly between the tap and guest memory; the only copy is the 12-byte header on TX.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable

from vionet import csum, vnethdr
from vionet.counters import Counters
from vionet.virtqueue import Chain, ChainError, RingError, SplitQueue
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF, VnetGso, VnetHdrFlags

log = logging.getLogger("vionet.datapath")

BATCH = 64  # packets between used-ring publications (and interrupts) while draining
IOV_MAX = 1024
MAX_GSO_FRAME = 65535 + 14 + 4  # tun never hands more than a 64 KiB IP packet plus L2
MAX_PLAIN_FRAME = 1514 + 4 + 4  # MTU 1500 + Ethernet + VLAN + slack


def _signal(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)


def _drain_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        os.read(fd, 8)


class QueueLoop:
    """A thread serving one virtqueue until :meth:`stop`."""

    name = "queue"

    def __init__(
        self,
        queue: SplitQueue,
        kick_fd: int,
        call_fd: int | None,
        tap_fd: int,
        acked: int,
        counters: Counters,
        on_ring_error: Callable[[str], None],
    ) -> None:
        self.q = queue
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.tap_fd = tap_fd
        self.acked = acked
        self.counters = counters
        self.on_ring_error = on_ring_error
        self.paused = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and join; afterwards ``q.last_avail_idx`` is final (for GET_VRING_BASE)."""
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive():
            self._thread.join()
        os.close(self._stop_fd)

    def wake(self) -> None:
        os.eventfd_write(self._stop_fd, 1)

    def _run(self) -> None:
        try:
            self.loop()
        except RingError as exc:
            self.counters.inc(f"ring_error_{exc.reason}")
            log.error("%s: ring broken (%s): device needs reset", self.name, exc)
            self.on_ring_error(str(exc))
        except Exception:  # never let a thread die silently: the device would just stop
            log.exception("%s: loop failed", self.name)
            self.counters.inc("loop_crash")
            self.on_ring_error("internal error")

    def loop(self) -> None:
        raise NotImplementedError

    def _interrupt(self) -> None:
        self.q.publish()
        if self.q.needs_interrupt():
            _signal(self.call_fd)


class TxLoop(QueueLoop):
    """Guest -> tap: validate each frame's vnet header, writev it to the tap."""

    name = "vionet-tx"

    def loop(self) -> None:
        poller = select.poll()
        poller.register(self.kick_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while not self._stopping:
            if not self.paused.is_set():
                self.drain()
            poller.poll()
            _drain_eventfd(self.kick_fd)
            _drain_eventfd(self._stop_fd)

    def drain(self) -> None:
        pending = 0
        while True:
            try:
                chain = self.q.pop()
            except ChainError as exc:
                self.counters.inc(f"tx_drop_{exc.reason}")
                self.q.push(exc.head, 0)
                pending += 1
                continue
            if chain is None:
                break
            self._send(chain)
            self.q.push(chain.head, 0)
            pending += 1
            if pending >= BATCH:
                self._interrupt()
                pending = 0
        if pending:
            self._interrupt()

    def _send(self, chain: Chain) -> None:
        if chain.writable:
            self.counters.inc("tx_drop_writable_descriptor")
            return
        iov = chain.readable
        try:
            raw = vnethdr.gather(iov)
        except vnethdr.HeaderError:
            self.counters.inc("tx_drop_short_header")
            return
        frame_len = chain.read_len - VNET_HDR_LEN
        verdict = vnethdr.validate_tx(raw, frame_len, self.acked)
        if isinstance(verdict, vnethdr.DropReason):
            self.counters.inc(f"tx_drop_{verdict.value}")
            return
        out: list[bytes | memoryview] = [vnethdr.for_tap(verdict)]
        out.extend(vnethdr.skip(iov, VNET_HDR_LEN))
        if len(out) > IOV_MAX:
            self.counters.inc("tx_drop_too_many_segments")
            return
        try:
            os.writev(self.tap_fd, out)
        except OSError as exc:
            self.counters.inc(f"tx_drop_tap_{errno.errorcode.get(exc.errno or 0, 'error')}")
            return
        self.counters.add("tx_packets", 1)
        self.counters.add("tx_bytes", frame_len)


class RxLoop(QueueLoop):
    """Tap -> guest: readv each frame straight into the guest's posted buffers.

    Buffers are popped ahead into a stash big enough for the largest frame the tap may hand us
    (one chain without MRG_RXBUF; as many as it takes with it) and stay there until a frame
    fills them, so no chain is walked twice. The stash is always the most recent pops, so when
    the queue stops it is given back with ``unpop`` and ``last_avail_idx`` stays exact.
    """

    name = "vionet-rx"

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
        self._room = 0

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            # Popped but unused buffers go back to the ring: GET_VRING_BASE must not count them.
            if self._stash and self.q.broken is None:
                self.q.unpop(len(self._stash))
            self._stash.clear()

    def loop(self) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self.kick_fd, select.POLLIN)
        tap_registered = False
        while not self._stopping:
            have_buffers = False
            if not self.paused.is_set():
                have_buffers = self.drain()
            # Watch the tap only while the guest has buffers for us: otherwise frames wait in
            # the tap's queue (and beyond it, the kernel drops) instead of us spinning.
            want_tap = have_buffers and not self.paused.is_set()
            if want_tap and not tap_registered:
                poller.register(self.tap_fd, select.POLLIN)
            elif not want_tap and tap_registered:
                poller.unregister(self.tap_fd)
            tap_registered = want_tap
            poller.poll()
            _drain_eventfd(self.kick_fd)
            _drain_eventfd(self._stop_fd)

    def _discard_stash(self) -> None:
        """Complete every stashed buffer empty (needed before completing a later-popped one)."""
        while self._stash:
            self.q.push(self._stash.popleft().head, 0)
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
        return True

    def _iov(self) -> list[memoryview]:
        iov: list[memoryview] = []
        room = 0
        for chain in self._stash:
            iov.extend(chain.writable)
            room += chain.write_len
            if room >= self.max_frame or len(iov) >= IOV_MAX:
                break
        return iov[:IOV_MAX]

    def drain(self) -> bool:
        """Move frames until the tap is empty (True) or the guest is out of buffers (False)."""
        pending = 0
        try:
            while True:
                if not self._fill():
                    return False
                iov = self._iov()
                try:
                    n = os.readv(self.tap_fd, iov)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    self.counters.inc(f"rx_tap_{errno.errorcode.get(exc.errno or 0, 'error')}")
                    return True
                if not self._fixup(iov, n):
                    continue  # dropped: the same buffers take the next frame
                pending += self._complete(n)
                if pending >= BATCH:
                    self._interrupt()
                    pending = 0
        finally:
            if pending:
                self._interrupt()

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

    def _complete(self, n: int) -> int:
        """Push the stashed chains the frame filled; set num_buffers. Returns how many."""
        stash = self._stash
        first = stash[0]
        left = n
        used = 0
        while left > 0:
            chain = stash.popleft()
            take = min(left, chain.write_len)
            self._room -= chain.write_len
            self.q.push(chain.head, take)
            used += 1
            left -= take
            if not self.mrg:
                break
        vnethdr.write_num_buffers(first.writable, used if self.mrg else 1)
        self.counters.add("rx_packets", 1)
        self.counters.add("rx_bytes", n - VNET_HDR_LEN)
        return used


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
