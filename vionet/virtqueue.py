"""The device side of a split virtqueue (virtio 1.2, 2.7), validated rule by rule.

Two kinds of failure. A *ring* error (avail idx ran more than the queue size ahead, a head
index out of range, rings outside guest memory) means the driver and device no longer agree on
the ring: the device must set DEVICE_NEEDS_RESET; the queue stays broken until rebuilt. A
*chain* error is one bad buffer: :meth:`SplitQueue.pop` has consumed it already and the caller
completes it with ``push(err.head, 0)`` and counts ``err.reason``.

Decisions the spec leaves open:
- zero-length descriptors are accepted and skipped (the spec does not forbid them; nothing is
  read or written through them, so their address is not checked); they still count towards the
  chain-length (loop) limit and the readable-before-writable order.
- an indirect descriptor may end a direct chain (as in Linux vhost), never carry NEXT, and its
  table has no alignment requirement; its WRITE flag is ignored (spec 2.7.5.3.2). Chains inside
  an indirect table may be as long as the table (Linux drivers exceed the queue size there).
- a descriptor buffer spanning two GPA-adjacent regions becomes two views.

Indexes are free-running u16 counters: ring slots are ``idx & (size - 1)`` and every
difference is taken modulo 65536, so wrap-around needs no special case.
"""

from __future__ import annotations

import enum
import struct
import sys
from collections import deque
from collections.abc import Sequence

from vionet.guestmem import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DEFAULT_MAX_CHAIN_BYTES = 12 + 65535 + 14 + 4 + 4096  # GSO frame + vnet header + slack

_DESC = struct.Struct("<QIHH")
_NOT_SIMPLE = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
# Virtio 1.x rings are little-endian; the typed views below use the host's order.
assert sys.byteorder == "little", "vionet's ring access assumes a little-endian host"


class RingErrorReason(enum.StrEnum):
    BAD_SIZE = "bad_size"
    MISALIGNED = "misaligned"
    RING_OUTSIDE_MEMORY = "ring_outside_memory"
    AVAIL_IDX_JUMP = "avail_idx_jump"
    HEAD_OUT_OF_RANGE = "head_out_of_range"


class ChainErrorReason(enum.StrEnum):
    NEXT_OUT_OF_RANGE = "next_out_of_range"
    LOOP = "loop"
    READ_AFTER_WRITE = "read_after_write"
    BUFFER_OUTSIDE_MEMORY = "buffer_outside_memory"
    CHAIN_TOO_BIG = "chain_too_big"
    INDIRECT_NOT_NEGOTIATED = "indirect_not_negotiated"
    INDIRECT_WITH_NEXT = "indirect_with_next"
    INDIRECT_BAD_LEN = "indirect_bad_len"
    INDIRECT_OUTSIDE_MEMORY = "indirect_outside_memory"
    NESTED_INDIRECT = "nested_indirect"


class VirtqueueError(Exception):
    pass


class RingError(VirtqueueError):
    """The ring itself is inconsistent: the device needs a reset."""

    def __init__(self, reason: RingErrorReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


class ChainError(VirtqueueError):
    """One descriptor chain is invalid; it has been consumed and must be pushed back."""

    def __init__(self, reason: ChainErrorReason, head: int, detail: str = "") -> None:
        super().__init__(f"chain {head}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.head = head
        # Chains pop_many() had taken before this one; the caller must complete them too.
        self.popped: list[Chain] = []


class UnpopError(VirtqueueError):
    """unpop() would hand the driver's buffer out again after it was completed."""


class Chain:
    """A validated descriptor chain: device-readable views first, then device-writable."""

    __slots__ = ("head", "read_len", "readable", "waddr", "writable", "write_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
        waddr: int = -1,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len
        # GPA of the first writable byte (-1: none). With one writable view, the chain's
        # writable bytes are exactly [waddr, waddr + write_len): RX coalesces adjacent ones.
        self.waddr = waddr

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, read_len={self.read_len}, write_len={self.write_len})"


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if moving an index from ``old`` to ``new`` crossed ``event`` (all u16)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class SplitQueue:
    """One split virtqueue over guest memory; not thread-safe (one thread per queue)."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        event_idx: bool,
        indirect: bool,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
        max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES,
        by_gpa: bool = False,
    ) -> None:
        """Ring addresses are QEMU virtual addresses (vhost-user), or GPAs with ``by_gpa``.

        ``used_idx`` None reads it from the ring (as a backend does when it (re)starts).
        """
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RingError(RingErrorReason.BAD_SIZE, f"size {size}")
        if desc_uva % 16 or avail_uva % 2 or used_uva % 4:
            raise RingError(
                RingErrorReason.MISALIGNED,
                f"desc {desc_uva:#x} avail {avail_uva:#x} used {used_uva:#x}",
            )
        extra = 2 if event_idx else 0
        lookup = mem.gpa if by_gpa else mem.uva
        try:
            self._desc = lookup(desc_uva, 16 * size)
            self._avail = lookup(avail_uva, 4 + 2 * size + extra)
            self._used = lookup(used_uva, 4 + 8 * size + extra)
        except GuestMemoryError as exc:
            raise RingError(RingErrorReason.RING_OUTSIDE_MEMORY, str(exc)) from exc
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain_bytes = max_chain_bytes
        # Ring indexes are shared with a driver running concurrently: every 16-bit index or
        # event field is read and written through typed views, i.e. one 16-bit load or store.
        # struct's "<H" goes byte by byte, and a torn used->idx (e.g. 0x00ff -> 0x0000 -> 0x0100)
        # lets the driver read a stale used entry: Linux's "id N is not a head!".
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._used32 = self._used[4 : 4 + 8 * size].cast("I")
        self._mask = size - 1
        self._last_avail = last_avail_idx & 0xFFFF
        self._avail_cache = self._last_avail
        if used_idx is None:
            used_idx = self._used16[1]
        self._used_idx = used_idx & 0xFFFF
        self._published = self._used_idx
        self._signalled = self._used_idx
        self._signalled_valid = False
        self._used_event_off = 4 + 2 * size
        self._avail_event_off = 4 + 8 * size
        # Heads of the most recent pops that are neither completed nor followed by a bad
        # chain: exactly the ones unpop() may hand back without returning a head twice.
        self._unpoppable: deque[int] = deque(maxlen=size)
        self.broken: RingError | None = None

    # -- indexes ---------------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        """SET_VRING_BASE: where the device resumes consuming the avail ring."""
        self._last_avail = value & 0xFFFF
        self._avail_cache = self._last_avail
        self._unpoppable.clear()

    @property
    def used_idx(self) -> int:
        """The device's used index including pushed but not yet published elements."""
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._used_idx = value & 0xFFFF
        self._published = self._used_idx
        self._signalled_valid = False

    def avail_idx(self) -> int:
        """The driver's avail index, read from the ring now."""
        idx: int = self._avail16[1]
        return idx

    def pending(self) -> int:
        """How many chains the driver has made available that we have not popped."""
        self._refresh()
        return (self._avail_cache - self._last_avail) & 0xFFFF

    def _refresh(self) -> None:
        if self.broken is not None:
            raise self.broken
        idx: int = self._avail16[1]
        if (idx - self._last_avail) & 0xFFFF > self.size:
            self._break(
                RingErrorReason.AVAIL_IDX_JUMP,
                f"avail idx {idx}, last_avail_idx {self._last_avail}, size {self.size}",
            )
        self._avail_cache = idx

    def _break(self, reason: RingErrorReason, detail: str) -> None:
        self.broken = RingError(reason, detail)
        raise self.broken

    # -- consuming -------------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available chain, or None if the driver has made none available.

        Raises ChainError for a bad chain (consumed: push it back with length 0) and
        RingError when the ring is broken (sticky until the queue is rebuilt).
        """
        if self._last_avail == self._avail_cache:
            # Read avail->idx once; ring entries are read only below that cached value.
            self._refresh()
            if self._last_avail == self._avail_cache:
                return None
        elif self.broken is not None:
            raise self.broken
        slot = self._last_avail & self._mask
        head: int = self._avail16[2 + slot]
        if head >= self.size:
            self._break(RingErrorReason.HEAD_OUT_OF_RANGE, f"head {head}, size {self.size}")
        self._last_avail = (self._last_avail + 1) & 0xFFFF
        # The common chain, one direct descriptor (Linux's RX buffers, pushed-header TX
        # frames), without the walk's set-up; anything else, or any doubt, takes the walk.
        addr, length, flags, _next = _DESC.unpack_from(self._desc, 16 * head)
        if not flags & _NOT_SIMPLE and 0 < length <= self.max_chain_bytes:
            try:
                view = self.mem.gpa(addr, length)
            except GuestMemoryError:
                pass  # the walk reports it (or splits it across regions)
            else:
                self._unpoppable.append(head)
                if flags & VIRTQ_DESC_F_WRITE:
                    return Chain(head, [], [view], 0, length, addr)
                return Chain(head, [view], [], length, 0)
        try:
            chain = self._walk(head)
        except ChainError:
            self._unpoppable.clear()
            raise
        self._unpoppable.append(head)
        return chain

    def pop_many(self, min_write_bytes: int, max_chains: int) -> list[Chain] | None:
        """Chains whose writable bytes add up to ``min_write_bytes`` (MRG_RXBUF), or None.

        None means not enough has been posted within ``max_chains``; nothing is taken then.
        A ChainError carries the good chains already taken in ``err.popped``: the caller
        completes them (e.g. with length 0) along with ``err.head``.
        """
        chains: list[Chain] = []
        room = 0
        while room < min_write_bytes and len(chains) < max_chains:
            try:
                chain = self.pop()
            except ChainError as err:
                err.popped = chains
                raise
            if chain is None:
                break
            chains.append(chain)
            room += chain.write_len
        if room < min_write_bytes:
            self.unpop(len(chains))
            return None
        return chains

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` popped chains (not yet pushed); they pop again next."""
        if n < 0 or n > len(self._unpoppable):
            raise UnpopError(
                f"unpop({n}): only {len(self._unpoppable)} recent pops are uncompleted"
            )
        for _ in range(n):
            self._unpoppable.pop()
        self._last_avail = (self._last_avail - n) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        mem_gpa = self.mem.gpa
        table = self._desc
        table_len = self.size
        limit = self.size
        unpack = _DESC.unpack_from
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        cap = self.max_chain_bytes
        in_indirect = False
        seen_write = False
        waddr = -1
        i = head
        count = 0
        while True:
            count += 1
            if count > limit:
                raise ChainError(ChainErrorReason.LOOP, head, f"more than {limit} descriptors")
            addr, length, flags, nxt = unpack(table, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(ChainErrorReason.INDIRECT_NOT_NEGOTIATED, head)
                if in_indirect:
                    raise ChainError(ChainErrorReason.NESTED_INDIRECT, head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(ChainErrorReason.INDIRECT_WITH_NEXT, head)
                if length == 0 or length % 16:
                    raise ChainError(ChainErrorReason.INDIRECT_BAD_LEN, head, f"len {length}")
                try:
                    table = mem_gpa(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(
                        ChainErrorReason.INDIRECT_OUTSIDE_MEMORY, head, str(exc)
                    ) from exc
                in_indirect = True
                table_len = limit = length // 16
                count = 0
                i = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise ChainError(ChainErrorReason.READ_AFTER_WRITE, head)
            if length:
                try:
                    views = [mem_gpa(addr, length)]
                except GuestMemoryError:
                    try:
                        views = self.mem.gpa_iov(addr, length)
                    except GuestMemoryError as exc:
                        raise ChainError(
                            ChainErrorReason.BUFFER_OUTSIDE_MEMORY, head, str(exc)
                        ) from exc
                if seen_write:
                    if not writable:
                        waddr = addr
                    writable += views
                    wlen += length
                else:
                    readable += views
                    rlen += length
                if rlen + wlen > cap:
                    raise ChainError(
                        ChainErrorReason.CHAIN_TOO_BIG, head, f"over {cap} bytes"
                    )
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, rlen, wlen, waddr)
            if nxt >= table_len:
                raise ChainError(
                    ChainErrorReason.NEXT_OUT_OF_RANGE, head, f"next {nxt} of {table_len}"
                )
            i = nxt

    # -- completing ------------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Add a used element (not visible to the driver until :meth:`publish`)."""
        slot = 2 * (self._used_idx & self._mask)
        used32 = self._used32
        used32[slot] = head
        used32[slot + 1] = written
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        recent = self._unpoppable
        if recent:
            if recent[-1] == head:
                recent.clear()
            elif head in recent:
                # Anything popped before this head can no longer be rewound to.
                while recent.popleft() != head:
                    pass

    def push_many(self, elems: Sequence[tuple[int, int]]) -> None:
        for head, written in elems:
            self.push(head, written)

    def publish(self) -> bool:
        """Make pushed elements visible: the elements were written first, now used->idx."""
        if self._published == self._used_idx:
            return False
        self._used16[1] = self._used_idx
        self._published = self._used_idx
        return True

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what has been published since last asked.

        Call after :meth:`publish`; each call consumes the published batch.
        """
        new = self._published
        old = self._signalled
        if self._signalled_valid and new == old:
            return False
        valid = self._signalled_valid
        self._signalled = new
        self._signalled_valid = True
        if not self.event_idx:
            flags: int = self._avail16[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        event: int = self._avail16[self._used_event_off // 2]
        return not valid or vring_need_event(event, new, old)

    # -- kick suppression ------------------------------------------------------------------

    def set_avail_event(self, idx: int | None = None) -> None:
        """EVENT_IDX: ask for a kick once the driver makes entry ``idx`` (default: the next
        one we would pop) available."""
        value = self._last_avail if idx is None else idx & 0xFFFF
        self._used16[self._avail_event_off // 2] = value

    def disable_notifications(self) -> None:
        """Ask the driver not to kick while we are draining anyway."""
        if not self.event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY
        # With EVENT_IDX a stale avail_event already suppresses kicks.

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if chains arrived meanwhile (drain again, or miss them)."""
        if self.event_idx:
            self.set_avail_event()
        else:
            self._used16[0] = 0
        return self.pending() > 0
