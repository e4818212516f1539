"""The virtio-net device behind a vhost-user session: queue 0 is RX, queue 1 is TX.

The session calls these hooks as QEMU configures the device; the hooks start and stop the packet
loops and report the guest's negotiation so the parent can switch the tap's offloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vionet.counters import Counters
from vionet.datapath import QueueLoop, RxLoop, TxLoop
from vionet.virtqueue import SplitQueue
from vmd_py.virtio_defs import NetF

log = logging.getLogger("vionet.device")

RX_QUEUE = 0
TX_QUEUE = 1


class NetDevice:
    def __init__(
        self,
        tap_fd: int,
        counters: Counters,
        request_offload: Callable[[int], None],
        on_ring_error: Callable[[str], None] | None = None,
    ) -> None:
        self.tap_fd = tap_fd
        self.counters = counters
        self._request_offload = request_offload
        self._on_ring_error = on_ring_error or (lambda why: None)
        self.acked = 0
        self.loops: dict[int, QueueLoop] = {}
        self.paused = False
        self._offload_dropped = False  # every ring stopped: the tap was told 0 meanwhile

    # --- DeviceHooks ------------------------------------------------------------------------

    def features_set(self, acked: int) -> None:
        self.acked = acked & ~NetF.PROTOCOL_FEATURES
        self._offload_dropped = False
        self._request_offload(self.acked)

    def queue_started(
        self, index: int, queue: SplitQueue, kick_fd: int, call_fd: int | None
    ) -> None:
        self.queue_stopped(index)
        cls = {RX_QUEUE: RxLoop, TX_QUEUE: TxLoop}.get(index)
        if cls is None:
            log.warning("queue %d is not a data queue; ignored", index)
            return
        loop = cls(
            queue, kick_fd, call_fd, self.tap_fd, self.acked, self.counters, self._on_ring_error
        )
        if self.paused:
            loop.paused.set()
        self.loops[index] = loop
        loop.start()
        if self._offload_dropped:
            # Restarted without a new SET_FEATURES (QEMU does that after SET_MEM_TABLE on
            # running rings): the guest's features still hold, and so may the tap's offloads.
            self._offload_dropped = False
            self._request_offload(self.acked)

    def queue_call_changed(self, index: int, call_fd: int | None) -> None:
        loop = self.loops.get(index)
        if loop is not None:
            loop.call_fd = call_fd

    def queue_stopped(self, index: int) -> int:
        loop = self.loops.pop(index, None)
        if loop is None:
            return 0
        loop.stop()
        if not self.loops:
            # The device is stopped (guest reset or shutdown): no tap offloads until a ring
            # runs again. The acked features stay, as the session's do: a front-end restarts
            # rings after a new memory table without repeating SET_FEATURES.
            self._offload_dropped = True
            self._request_offload(0)
        return loop.q.last_avail_idx

    def reset(self) -> None:
        for index in list(self.loops):
            self.queue_stopped(index)
        self.acked = 0
        self._request_offload(0)

    # --- vmctl pause -----------------------------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        for loop in self.loops.values():
            if paused:
                loop.paused.set()
            else:
                loop.paused.clear()
            loop.wake()
