"""A fake virtio driver: lays out a split virtqueue in guest memory and plays the guest side.

Works on any GuestMemory (bytearrays here; a memfd mapping for vhost-user device tests).
It checks the device the way Linux does: a used id that is not an outstanding head fails
with the guest's own words, "id N is not a head!".
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vionet.guestmem import GuestMemory, GuestMemoryError, Region
from vionet.virtqueue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_ELEM = struct.Struct("<II")
UVA_BASE = 0x7F00_0000_0000


def make_memory(
    layout: Sequence[tuple[int, int]] = ((0, 1 << 20),), uva_base: int = UVA_BASE
) -> tuple[GuestMemory, list[bytearray]]:
    """GuestMemory over bytearrays: ``layout`` is (gpa, size) per region; UVAs are spread
    out (not adjacent) so GPA and UVA lookups cannot be confused."""
    bufs = [bytearray(size) for _, size in layout]
    regions = [
        Region(gpa, size, uva_base + k * (1 << 32), memoryview(buf))
        for k, ((gpa, size), buf) in enumerate(zip(layout, bufs, strict=True))
    ]
    return GuestMemory(regions), bufs


@dataclass
class Used:
    head: int
    length: int
    written: bytes  # the first ``length`` bytes of the chain's writable buffers


@dataclass
class _Outstanding:
    descs: list[int]
    writable: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len)


class FakeDriver:
    """The guest side of one split queue of ``size`` entries at ``base_gpa``."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        *,
        base_gpa: int = 0,
        data_gpa: int | None = None,
        data_end: int | None = None,
        event_idx: bool = False,
        start_idx: int = 0,
        used_gpa: int | None = None,
    ) -> None:
        """``used_gpa`` places the used ring (default: the page after the avail ring), to
        match a front-end's layout."""
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        extra = 2 if event_idx else 0
        self.desc_gpa = base_gpa
        self.avail_gpa = base_gpa + 16 * size
        avail_end = self.avail_gpa + 4 + 2 * size + extra
        self.used_gpa = (avail_end + 4095) & ~4095 if used_gpa is None else used_gpa
        used_end = self.used_gpa + 4 + 8 * size + extra
        self.write(base_gpa, bytes(used_end - base_gpa))
        self._data_start = ((used_end + 4095) & ~4095) if data_gpa is None else data_gpa
        self._next = self._data_start
        if data_end is None:
            data_end = self._data_start
            while True:  # to the end of the GPA-contiguous memory
                try:
                    mem.gpa_iov(data_end, 1)
                except GuestMemoryError:
                    break
                data_end = max(data_end + 1, self._region_end(data_end))
        self._data_end = data_end
        self.start_idx = start_idx & 0xFFFF
        self.avail_idx = self.start_idx  # driver's shadow, exposed by expose()
        self.last_used = self.start_idx
        self._write_u16(self.avail_gpa + 2, self.start_idx)
        self._write_u16(self.used_gpa + 2, self.start_idx)
        self.free = list(range(size))
        self.outstanding: dict[int, _Outstanding] = {}

    # -- raw memory ------------------------------------------------------------------------

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for v in self.mem.gpa_iov(gpa, len(data)):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(bytes(v) for v in self.mem.gpa_iov(gpa, n))

    def _write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))

    def _read_u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self.read(gpa, 2))[0]
        return value

    def _region_end(self, gpa: int) -> int:
        for r in self.mem.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.gpa + r.size
        return gpa + 1

    def alloc(self, n: int, align: int = 16) -> int:
        """Allocate guest memory for a buffer, cycling through the data area: space is reused
        once the area wraps, so keep less than the whole area outstanding."""
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + n > self._data_end:
            gpa = (self._data_start + align - 1) & ~(align - 1)
            if gpa + n > self._data_end:
                raise MemoryError("fake driver: buffer larger than the data area")
        self._next = gpa + max(n, 1)
        return gpa

    # -- the device side -------------------------------------------------------------------

    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.used_gpa)

    def queue(self, *, indirect: bool = True, **kw: int | bool) -> SplitQueue:
        """The device's SplitQueue for this ring, resuming at ``start_idx``."""
        return SplitQueue(
            self.mem,
            self.size,
            self.desc_uva,
            self.avail_uva,
            self.used_uva,
            event_idx=self.event_idx,
            indirect=indirect,
            last_avail_idx=self.start_idx,
            **kw,  # type: ignore[arg-type]
        )

    # -- posting buffers -------------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.write(self.desc_gpa + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = _DESC.unpack(self.read(self.desc_gpa + 16 * i, 16))
        return addr, length, flags, nxt

    def add(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        expose: bool = True,
    ) -> int:
        """Post a chain: device-readable buffers with this content, then device-writable
        buffers of these sizes. Returns its head."""
        entries: list[tuple[int, int, int]] = []
        for data in readable:
            gpa = self.alloc(len(data))
            self.write(gpa, data)
            entries.append((gpa, len(data), 0))
        wbufs: list[tuple[int, int]] = []
        for n in writable:
            gpa = self.alloc(n)
            self.write(gpa, bytes(n))
            entries.append((gpa, n, VIRTQ_DESC_F_WRITE))
            wbufs.append((gpa, n))
        if not entries:
            raise ValueError("empty chain")
        if indirect:
            table = self.alloc(16 * len(entries))
            for k, (gpa, n, flags) in enumerate(entries):
                more = VIRTQ_DESC_F_NEXT if k + 1 < len(entries) else 0
                self.write(table + 16 * k, _DESC.pack(gpa, n, flags | more, k + 1 if more else 0))
            entries = [(table, 16 * len(entries), VIRTQ_DESC_F_INDIRECT)]
        if len(entries) > len(self.free):
            raise MemoryError("no free descriptors")
        descs = [self.free.pop(0) for _ in entries]
        for k, (gpa, n, flags) in enumerate(entries):
            more = k + 1 < len(entries)
            self.write_desc(
                descs[k], gpa, n, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                descs[k + 1] if more else 0,
            )
        head = descs[0]
        self.outstanding[head] = _Outstanding(descs, wbufs)
        self.post(head, expose=expose)
        return head

    def post(self, head: int, *, expose: bool = True) -> None:
        """Put ``head`` in the avail ring (for chains crafted with write_desc, call
        :meth:`track` first so get_used accepts it)."""
        self._write_u16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if expose:
            self.expose()

    def track(self, head: int, descs: Iterable[int] = ()) -> None:
        """Treat a hand-crafted chain at ``head`` as outstanding."""
        descs = list(descs) or [head]
        for d in descs:
            if d in self.free:
                self.free.remove(d)
        self.outstanding[head] = _Outstanding(descs)

    def expose(self) -> None:
        """Publish avail->idx (after the ring entries, as a driver must)."""
        self._write_u16(self.avail_gpa + 2, self.avail_idx)

    def set_avail_idx_raw(self, value: int) -> None:
        self._write_u16(self.avail_gpa + 2, value)

    # -- completions -----------------------------------------------------------------------

    def used_idx(self) -> int:
        return self._read_u16(self.used_gpa + 2)

    def get_used(self) -> list[Used]:
        """New used elements since the last call, checked like a Linux guest would."""
        out: list[Used] = []
        idx = self.used_idx()
        pending = (idx - self.last_used) & 0xFFFF
        if pending > self.size:
            raise AssertionError(f"used idx {idx} ran {pending} ahead (size {self.size})")
        for _ in range(pending):
            slot = self.last_used % self.size
            head, length = _ELEM.unpack(self.read(self.used_gpa + 4 + 8 * slot, 8))
            if head >= self.size:
                raise AssertionError(f"id {head} out of range")
            rec = self.outstanding.pop(head, None)
            if rec is None:
                raise AssertionError(f"id {head} is not a head!")
            written = bytearray()
            left = length
            for gpa, n in rec.writable:
                take = min(n, left)
                written += self.read(gpa, take)
                left -= take
            out.append(Used(head, length, bytes(written)))
            self.free.extend(rec.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # -- notification fields ---------------------------------------------------------------

    def set_no_interrupt(self, on: bool) -> None:
        self._write_u16(self.avail_gpa, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self._write_u16(self.avail_gpa + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self._read_u16(self.used_gpa + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self._read_u16(self.used_gpa)

    def needs_kick(self, old: int) -> bool:
        """Whether moving avail idx from ``old`` to now needs a kick (driver side)."""
        if self.event_idx:
            event = self.avail_event()
            return ((self.avail_idx - event - 1) & 0xFFFF) < ((self.avail_idx - old) & 0xFFFF)
        return not self.used_flags() & 1
