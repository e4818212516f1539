"""The virtio-net device behind a vhost-user session: queue 0 is RX, queue 1 is TX.

The session calls these hooks as QEMU configures the device; the hooks start and stop the packet
loops and report the guest's negotiation so the parent can switch the tap's offloads. The NIC's
rules (locked lladdr, a local interface's DHCP) are fixed for the device's life and handed to
every loop it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vionet.counters import Counters
from vionet.datapath import (
    DEFAULT_POLL_US,
    Engine,
    InjectQueue,
    LinkRules,
    QueueLoop,
    RxLoop,
    TxLoop,
)
from vionet.dhcp import DhcpResponder, LocalLink
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
        *,
        mac: bytes | None = None,
        locked: bool = False,
        local: LocalLink | None = None,
        poll_us: int = DEFAULT_POLL_US,
    ) -> None:
        if (locked or local is not None) and (mac is None or len(mac) != 6):
            raise ValueError("locked lladdr and local interface need the VM's MAC")
        self.tap_fd = tap_fd
        self.counters = counters
        self.injected = InjectQueue(counters, self._wake_rx)
        self.rules = LinkRules(
            locked_mac=bytes(mac) if locked and mac is not None else None,
            dhcp=DhcpResponder(mac, local, counters) if local is not None and mac else None,
            injected=self.injected,
        )
        self._request_offload = request_offload
        self._on_ring_error = on_ring_error or (lambda why: None)
        self.acked = 0
        self.loops: dict[int, QueueLoop] = {}
        self.engine = Engine(poll_us=poll_us)  # one thread for both queues (see datapath.Engine)
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
            queue, kick_fd, call_fd, self.tap_fd, self.acked, self.counters, self._on_ring_error,
            self.rules, self.engine,
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
        self.injected.clear()  # replies for the guest before the reset mean nothing after it
        self._request_offload(0)

    def close(self) -> None:
        """The connection is over (its session has reset the device): free the engine's
        eventfd, at once or when its thread ends."""
        self.engine.close()

    def _wake_rx(self) -> None:
        loop = self.loops.get(RX_QUEUE)
        if loop is not None:
            loop.wake()  # harmless on a loop being stopped: wake() checks under a lock

    # --- vmctl pause -----------------------------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        for loop in self.loops.values():
            if paused:
                loop.paused.set()
            else:
                loop.paused.clear()
            loop.wake()
