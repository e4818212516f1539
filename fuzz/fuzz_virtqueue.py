"""Fuzz the split-virtqueue chain walker over guest memory the fuzzer writes (descriptor
table, avail ring, indirect tables, buffers). Only VirtqueueError subclasses may escape, and
every view a chain hands out lies inside one guest memory region."""

from __future__ import annotations

import ctypes

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
from _formats import (
    RING_BY_GPA,
    RING_CAP,
    RING_EVENT_IDX,
    RING_INDIRECT,
    RING_POP_MANY,
    RING_REGIONS,
    RingCase,
)
from _fuzzlib import check

with atheris.instrument_imports(include=["vionet.virtqueue", "vionet.guestmem"]):
    from vionet.guestmem import GuestMemory, GuestMemoryError
    from vionet.virtqueue import Chain, ChainError, RingError, SplitQueue

from tests.virtio_harness import make_memory


def _address(view: memoryview | bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Bounds:
    def __init__(self, bufs: list[bytearray]) -> None:
        self.spans = [(_address(b), len(b)) for b in bufs]

    def inside(self, view: memoryview) -> bool:
        if len(view) == 0:
            return True
        start = _address(view)
        return any(base <= start and start + len(view) <= base + n for base, n in self.spans)


def _check_chain(chain: Chain, queue: SplitQueue, bounds: _Bounds) -> None:
    check(0 <= chain.head < queue.size, f"head {chain.head} of {queue.size}")
    for v in (*chain.readable, *chain.writable):
        check(not v.readonly and v.contiguous, "odd view")
        check(bounds.inside(v), f"view of {len(v)} bytes outside guest memory")
    check(chain.read_len == sum(len(v) for v in chain.readable), "read_len")
    check(chain.write_len == sum(len(v) for v in chain.writable), "write_len")
    check(chain.read_len + chain.write_len <= queue.max_chain_bytes, "chain over the cap")


def _ring_addr(mem: GuestMemory, gpa: int, by_gpa: bool) -> int:
    if by_gpa:
        return gpa
    try:
        return mem.gpa_to_uva(gpa)
    except GuestMemoryError:
        return gpa  # not guest memory as a UVA either


def _fill(bufs: list[bytearray], image: bytes) -> None:
    pos = 0
    for buf in bufs:
        chunk = image[pos : pos + len(buf)]
        buf[: len(chunk)] = chunk
        pos += len(chunk)


def _drain(queue: SplitQueue, case: RingCase, bounds: _Bounds) -> list[tuple[int, int]]:
    """Pop until None or a broken ring; the (head, written) pairs to complete.

    Nothing is written to guest memory meanwhile (rings may overlap, so a push could post
    more chains), and pending() never exceeds the size: this many pops must end it.
    """
    done: list[tuple[int, int]] = []
    for _ in range(queue.size + 1):
        try:
            if case.flags & RING_POP_MANY:
                chains = queue.pop_many(case.min_write, max(case.max_chains, 1))
                if not chains:  # None, or [] when no bytes were asked for
                    return done
            else:
                chain = queue.pop()
                if chain is None:
                    return done
                chains = [chain]
        except ChainError as err:
            check(0 <= err.head < queue.size, f"error head {err.head}")
            for c in err.popped:
                _check_chain(c, queue, bounds)
                done.append((c.head, 0))
            done.append((err.head, 0))
            continue
        except RingError:
            check(queue.broken is not None, "RingError without a broken queue")
            try:
                queue.pop()
            except RingError:
                return done
            raise _fuzzlib.Invariant("a broken queue popped again") from None
        for c in chains:
            _check_chain(c, queue, bounds)
            done.append((c.head, c.write_len))
    raise _fuzzlib.Invariant("more chains popped than the queue holds")


def test_one_input(data: bytes) -> None:
    case = RingCase.parse(data)
    mem, bufs = make_memory(RING_REGIONS)
    _fill(bufs, case.memory)
    bounds = _Bounds(bufs)
    by_gpa = bool(case.flags & RING_BY_GPA)
    kw: dict[str, int] = {}
    if case.flags & RING_CAP:
        kw["max_chain_bytes"] = case.max_chain_bytes
    try:
        queue = SplitQueue(
            mem,
            case.size,
            _ring_addr(mem, case.desc, by_gpa),
            _ring_addr(mem, case.avail, by_gpa),
            _ring_addr(mem, case.used, by_gpa),
            event_idx=bool(case.flags & RING_EVENT_IDX),
            indirect=bool(case.flags & RING_INDIRECT),
            last_avail_idx=case.last_avail,
            by_gpa=by_gpa,
            **kw,
        )
    except RingError:
        return
    done = _drain(queue, case, bounds)
    queue.push_many(done)
    queue.publish()
    queue.needs_interrupt()
    try:
        queue.enable_notifications()
    except RingError:
        check(queue.broken is not None, "RingError without a broken queue")


if __name__ == "__main__":
    _fuzzlib.main("virtqueue", test_one_input, max_len=24 * 1024)
