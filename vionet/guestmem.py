"""Guest memory: translate guest-physical (GPA) and QEMU-virtual (UVA) addresses to views.

vhost-user hands the device up to 8 regions, each an mmap of a memfd; descriptors carry GPAs,
vring addresses arrive as QEMU's own virtual addresses. Every view handed out lies entirely
inside one region, so a hostile address can never reach memory the guest does not own.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
_ADDR_LIMIT = 1 << 64


class GuestMemoryError(Exception):
    """An address range that is not backed by guest memory, or a bad region table."""


@dataclass(frozen=True)
class Region:
    gpa: int
    size: int
    uva: int
    buf: memoryview  # writable view of the mapping (mmap or bytearray), at least size bytes


class _Index:
    """Sorted lookup over one address space, remembering the last region hit."""

    __slots__ = ("_bufs", "_ends", "_last", "_starts")

    def __init__(self, spans: list[tuple[int, int, memoryview]]) -> None:
        spans = sorted(spans, key=lambda s: s[0])
        for (s0, n0, _), (s1, _, _) in itertools.pairwise(spans):
            if s0 + n0 > s1:
                raise GuestMemoryError(f"regions overlap at {s1:#x}")
        self._starts = [s for s, _, _ in spans]
        self._ends = [s + n for s, n, _ in spans]
        self._bufs = [b for _, _, b in spans]
        self._last = 0

    def view(self, addr: int, length: int) -> memoryview:
        i = self._last
        start = self._starts[i]
        # Fast path: the same region as last time (rings and packet buffers cluster).
        if start <= addr and length >= 0 and addr + length <= self._ends[i]:
            off = addr - start
            return self._bufs[i][off : off + length]
        if addr < 0 or length < 0 or addr + length > _ADDR_LIMIT:
            raise GuestMemoryError(f"bad range {addr:#x}+{length:#x}")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr + length > self._ends[i]:
            raise GuestMemoryError(f"range {addr:#x}+{length:#x} is not inside one region")
        self._last = i
        off = addr - self._starts[i]
        return self._bufs[i][off : off + length]

    def iov(self, addr: int, length: int) -> list[memoryview]:
        if addr < 0 or length < 0 or addr + length > _ADDR_LIMIT:
            raise GuestMemoryError(f"bad range {addr:#x}+{length:#x}")
        out: list[memoryview] = []
        while True:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0 or addr >= self._ends[i]:
                raise GuestMemoryError(f"address {addr:#x} is not guest memory")
            take = min(length, self._ends[i] - addr)
            off = addr - self._starts[i]
            out.append(self._bufs[i][off : off + take])
            length -= take
            addr += take
            if length == 0:
                return out

    def translate(self, addr: int, to: _Index, order: list[int]) -> int:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._ends[i]:
            raise GuestMemoryError(f"address {addr:#x} is not guest memory")
        j = order[i]
        return to._starts[j] + (addr - self._starts[i])


class GuestMemory:
    """Up to 8 non-overlapping regions, looked up by GPA or by QEMU virtual address."""

    def __init__(self, regions: Sequence[Region]) -> None:
        if not regions:
            raise GuestMemoryError("no regions")
        if len(regions) > MAX_REGIONS:
            raise GuestMemoryError(f"{len(regions)} regions, at most {MAX_REGIONS}")
        views: list[memoryview] = []
        for r in regions:
            if r.size <= 0:
                raise GuestMemoryError(f"region at {r.gpa:#x}: size {r.size}")
            for base in (r.gpa, r.uva):
                if base < 0 or base + r.size > _ADDR_LIMIT:
                    raise GuestMemoryError(f"region at {base:#x}+{r.size:#x} wraps")
            buf = r.buf.cast("B") if r.buf.format != "B" else r.buf
            if buf.readonly or len(buf) < r.size:
                raise GuestMemoryError(f"region at {r.gpa:#x}: buffer read-only or short")
            views.append(buf[: r.size])
        self._views = views
        self._regions = tuple(regions)
        self._gpa = _Index([(r.gpa, r.size, v) for r, v in zip(regions, views, strict=True)])
        self._uva = _Index([(r.uva, r.size, v) for r, v in zip(regions, views, strict=True)])
        by_gpa = sorted(range(len(regions)), key=lambda k: regions[k].gpa)
        by_uva = sorted(range(len(regions)), key=lambda k: regions[k].uva)
        uva_rank = {k: n for n, k in enumerate(by_uva)}
        gpa_rank = {k: n for n, k in enumerate(by_gpa)}
        self._gpa_to_uva = [uva_rank[k] for k in by_gpa]
        self._uva_to_gpa = [gpa_rank[k] for k in by_uva]
        self._closed = False

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    def gpa(self, addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at guest-physical ``addr``, inside one region."""
        return self._gpa.view(addr, length)

    def uva(self, addr: int, length: int) -> memoryview:
        """A view of ``length`` bytes at QEMU virtual address ``addr``, inside one region."""
        return self._uva.view(addr, length)

    def gpa_iov(self, addr: int, length: int) -> list[memoryview]:
        """Views covering ``addr``..``addr+length``, split where GPA-adjacent regions meet."""
        if length == 0:
            if addr < 0:
                raise GuestMemoryError(f"bad address {addr:#x}")
            return []
        return self._gpa.iov(addr, length)

    def uva_to_gpa(self, addr: int) -> int:
        return self._uva.translate(addr, self._gpa, self._uva_to_gpa)

    def gpa_to_uva(self, addr: int) -> int:
        return self._gpa.translate(addr, self._uva, self._gpa_to_uva)

    def close(self) -> None:
        """Release every view, the regions' own ``buf`` included (GuestMemory owns them), so
        the mmap owner can close the mappings.

        Views already handed out (chains in flight) keep their own export alive: drop them
        first, or the owner's mmap.close() raises BufferError.
        """
        if self._closed:
            return
        self._closed = True
        empty: list[tuple[int, int, memoryview]] = [(0, 0, memoryview(bytearray()))]
        self._gpa = _Index(empty)
        self._uva = _Index(empty)
        for v in self._views:
            v.release()
        for r in self._regions:
            r.buf.release()
        self._views = []
        self._regions = ()
