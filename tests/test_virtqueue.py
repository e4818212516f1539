from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.virtio_harness import FakeDriver, make_memory
from vionet.guestmem import GuestMemory
from vionet.virtqueue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    ChainError,
    ChainErrorReason,
    RingError,
    RingErrorReason,
    SplitQueue,
    UnpopError,
    VirtqueueError,
    vring_need_event,
)

R = ChainErrorReason
N, W, IND = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MEM = 1 << 20


def setup(
    size: int = 8,
    *,
    event_idx: bool = False,
    start: int = 0,
    indirect: bool = True,
    max_chain_bytes: int = 1 << 17,
) -> tuple[FakeDriver, SplitQueue]:
    mem, _ = make_memory(((0, MEM),))
    drv = FakeDriver(mem, size, event_idx=event_idx, start_idx=start)
    return drv, drv.queue(indirect=indirect, max_chain_bytes=max_chain_bytes)


def chain_bytes(views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 1 << 16 | 1])
def test_size_must_be_a_power_of_two_up_to_32768(size: int) -> None:
    mem, _ = make_memory(((0, 1 << 20),))
    with pytest.raises(RingError) as err:
        SplitQueue(mem, size, 0, 0x1000, 0x2000, event_idx=False, indirect=False, by_gpa=True)
    assert err.value.reason is RingErrorReason.BAD_SIZE


def test_largest_queue_fits() -> None:
    mem, _ = make_memory(((0, 1 << 20),))
    q = SplitQueue(
        mem, 32768, 0, 0x80000, 0x90000, event_idx=True, indirect=False, by_gpa=True
    )
    assert q.pop() is None


@pytest.mark.parametrize(("desc", "avail", "used"), [(8, 0x1000, 0x2000), (0, 0x1001, 0x2000),
                                                      (0, 0x1000, 0x2002)])
def test_ring_alignment(desc: int, avail: int, used: int) -> None:
    mem, _ = make_memory(((0, 1 << 20),))
    with pytest.raises(RingError) as err:
        SplitQueue(mem, 8, desc, avail, used, event_idx=False, indirect=False, by_gpa=True)
    assert err.value.reason is RingErrorReason.MISALIGNED


@pytest.mark.parametrize(("desc", "avail", "used"), [(0xFFF80, 0, 0x1000),
                                                      (0, 0xFFFF0, 0x1000),
                                                      (0, 0x1000, 0xFFFE0)])
def test_rings_must_lie_in_guest_memory(desc: int, avail: int, used: int) -> None:
    mem, _ = make_memory(((0, 1 << 20),))
    with pytest.raises(RingError) as err:
        SplitQueue(mem, 16, desc, avail, used, event_idx=True, indirect=False, by_gpa=True)
    assert err.value.reason is RingErrorReason.RING_OUTSIDE_MEMORY


def test_ring_addresses_are_qemu_virtual_addresses() -> None:
    mem, _ = make_memory(((0, 1 << 20),))
    with pytest.raises(RingError):  # GPAs given where vhost-user sends UVAs
        SplitQueue(mem, 8, 0, 0x1000, 0x2000, event_idx=False, indirect=False)


# -- the basic cycle -----------------------------------------------------------------------


def test_pop_push_publish_round_trip() -> None:
    drv, q = setup()
    assert q.pop() is None
    head = drv.add([b"hello", b" world"], [4, 6])
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain_bytes(chain.readable) == b"hello world"
    assert chain.read_len == 11 and chain.write_len == 10
    assert [len(v) for v in chain.writable] == [4, 6]
    chain.writable[0][:] = b"abcd"
    chain.writable[1][:2] = b"ef"
    q.push(chain.head, 6)
    assert drv.get_used() == []  # nothing visible before publish
    assert q.publish() is True
    assert q.publish() is False
    [used] = drv.get_used()
    assert (used.head, used.length, used.written) == (head, 6, b"abcdef")
    assert q.pop() is None


def test_unexposed_ring_entries_are_not_read() -> None:
    drv, q = setup()
    drv.add([b"x"], expose=False)
    assert q.pop() is None
    assert q.pending() == 0
    drv.expose()
    assert q.pending() == 1
    assert q.pop() is not None


def test_avail_idx_is_read_once_per_batch() -> None:
    drv, q = setup()
    drv.add([b"a"])
    drv.add([b"b"])
    assert q.pop() is not None
    drv.set_avail_idx_raw(1000)  # a jump the device only notices on its next read
    assert q.pop() is not None
    with pytest.raises(RingError) as err:
        q.pop()
    assert err.value.reason is RingErrorReason.AVAIL_IDX_JUMP


# -- ring errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("jump", [9, 0x8000, 0xFFFF])
def test_avail_idx_running_more_than_size_ahead_breaks_the_ring(jump: int) -> None:
    drv, q = setup(8)
    drv.set_avail_idx_raw(jump)
    with pytest.raises(RingError) as err:
        q.pop()
    assert err.value.reason is RingErrorReason.AVAIL_IDX_JUMP
    assert q.broken is not None
    drv.set_avail_idx_raw(0)
    with pytest.raises(RingError):  # sticky until the queue is rebuilt
        q.pop()


def test_exactly_size_ahead_is_fine() -> None:
    drv, q = setup(8)
    heads = [drv.add([b"x"]) for _ in range(8)]
    assert [c.head for c in iter(q.pop, None) if c is not None] == heads


def test_head_out_of_range_breaks_the_ring() -> None:
    drv, q = setup(8)
    drv.post(8)
    with pytest.raises(RingError) as err:
        q.pop()
    assert err.value.reason is RingErrorReason.HEAD_OUT_OF_RANGE
    with pytest.raises(RingError):
        q.pending()


# -- chain errors: each rule ----------------------------------------------------------------


def bad_chain(drv: FakeDriver, descs: dict[int, tuple[int, int, int, int]], head: int = 0) -> None:
    for i, (addr, length, flags, nxt) in descs.items():
        drv.write_desc(i, addr, length, flags, nxt)
    drv.track(head, descs)
    drv.post(head)


def expect_chain_error(drv: FakeDriver, q: SplitQueue, reason: R, head: int = 0) -> None:
    with pytest.raises(ChainError) as err:
        q.pop()
    assert err.value.reason is reason
    assert err.value.head == head
    # Consumed: completing it is legal and the queue carries on.
    q.push(err.value.head, 0)
    q.publish()
    [used] = drv.get_used()
    assert (used.head, used.length) == (head, 0)
    good = drv.add([b"ok"])
    chain = q.pop()
    assert chain is not None and chain.head == good


def test_next_out_of_range() -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (0x10000, 4, N, 8)})
    expect_chain_error(drv, q, R.NEXT_OUT_OF_RANGE)


def test_loop() -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (0x10000, 4, N, 1), 1: (0x10000, 4, N, 0)})
    expect_chain_error(drv, q, R.LOOP)


def test_self_loop() -> None:
    drv, q = setup(8)
    bad_chain(drv, {3: (0x10000, 4, N, 3)}, head=3)
    expect_chain_error(drv, q, R.LOOP, head=3)


def test_chain_of_exactly_size_descriptors_is_fine() -> None:
    drv, q = setup(8)
    descs = {i: (0x10000 + i, 1, N if i < 7 else 0, i + 1 if i < 7 else 0) for i in range(8)}
    bad_chain(drv, descs)
    chain = q.pop()
    assert chain is not None and chain.read_len == 8 and len(chain.readable) == 8


def test_readable_after_writable() -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (0x10000, 4, W | N, 1), 1: (0x10010, 4, 0, 0)})
    expect_chain_error(drv, q, R.READ_AFTER_WRITE)


def test_zero_length_readable_after_writable_still_breaks_the_order() -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (0x10000, 0, W | N, 1), 1: (0x10010, 0, 0, 0)})
    expect_chain_error(drv, q, R.READ_AFTER_WRITE)


@pytest.mark.parametrize("addr", [MEM - 2, MEM, 1 << 63, (1 << 64) - 1])
def test_buffer_outside_memory(addr: int) -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (0x10000, 4, N, 1), 1: (addr, 4, W, 0)})
    expect_chain_error(drv, q, R.BUFFER_OUTSIDE_MEMORY)


def test_zero_length_descriptors_are_skipped_without_address_checks() -> None:
    drv, q = setup(8)
    drv.write(0x10000, b"abcd")
    bad_chain(drv, {0: ((1 << 64) - 1, 0, N, 1), 1: (0x10000, 4, N, 2), 2: (0xDEAD << 40, 0, W, 0)})
    chain = q.pop()
    assert chain is not None
    assert chain_bytes(chain.readable) == b"abcd" and chain.writable == []
    assert (chain.read_len, chain.write_len) == (4, 0)


def test_chain_too_big() -> None:
    drv, q = setup(8, max_chain_bytes=1000)
    bad_chain(drv, {0: (0x10000, 600, N, 1), 1: (0x20000, 401, W, 0)})
    expect_chain_error(drv, q, R.CHAIN_TOO_BIG)


def test_chain_at_the_cap_is_fine() -> None:
    drv, q = setup(8, max_chain_bytes=1000)
    bad_chain(drv, {0: (0x10000, 600, N, 1), 1: (0x20000, 400, W, 0)})
    chain = q.pop()
    assert chain is not None and chain.read_len + chain.write_len == 1000


def test_buffer_across_adjacent_regions_becomes_two_views() -> None:
    mem, bufs = make_memory(((0, 0x10000), (0x10000, 0x10000)))
    bufs[0][-3:] = b"abc"
    bufs[1][:2] = b"de"
    drv = FakeDriver(mem, 8, data_gpa=0x8000)
    q = drv.queue()
    bad_chain(drv, {0: (0xFFFD, 5, 0, 0)})
    chain = q.pop()
    assert chain is not None
    assert [bytes(v) for v in chain.readable] == [b"abc", b"de"]


def test_buffer_across_a_hole_is_refused() -> None:
    mem, _ = make_memory(((0, 0x10000), (0x20000, 0x10000)))
    drv = FakeDriver(mem, 8)
    q = drv.queue()
    bad_chain(drv, {0: (0xFFFD, 5, 0, 0)})
    with pytest.raises(ChainError) as err:
        q.pop()
    assert err.value.reason is R.BUFFER_OUTSIDE_MEMORY


# -- indirect -----------------------------------------------------------------------------


def write_table(drv: FakeDriver, gpa: int, entries: list[tuple[int, int, int, int]]) -> None:
    drv.write(gpa, b"".join(struct.pack("<QIHH", *e) for e in entries))


def test_indirect_chain() -> None:
    drv, q = setup(8)
    head = drv.add([b"head", b"er"], [10, 20], indirect=True)
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert chain_bytes(chain.readable) == b"header"
    assert [len(v) for v in chain.writable] == [10, 20]


def test_indirect_not_negotiated() -> None:
    drv, q = setup(8, indirect=False)
    drv.add([b"x"], indirect=True)
    with pytest.raises(ChainError) as err:
        q.pop()
    assert err.value.reason is R.INDIRECT_NOT_NEGOTIATED


def test_indirect_with_next() -> None:
    drv, q = setup(8)
    write_table(drv, 0x30000, [(0x10000, 4, 0, 0)])
    bad_chain(drv, {0: (0x30000, 16, IND | N, 1), 1: (0x10000, 4, 0, 0)})
    expect_chain_error(drv, q, R.INDIRECT_WITH_NEXT)


@pytest.mark.parametrize("length", [0, 8, 17, 31])
def test_indirect_table_length(length: int) -> None:
    drv, q = setup(8)
    write_table(drv, 0x30000, [(0x10000, 4, 0, 0)] * 2)
    bad_chain(drv, {0: (0x30000, length, IND, 0)})
    expect_chain_error(drv, q, R.INDIRECT_BAD_LEN)


def test_indirect_table_outside_memory() -> None:
    drv, q = setup(8)
    bad_chain(drv, {0: (MEM - 16, 32, IND, 0)})
    expect_chain_error(drv, q, R.INDIRECT_OUTSIDE_MEMORY)


def test_nested_indirect() -> None:
    drv, q = setup(8)
    write_table(drv, 0x31000, [(0x10000, 4, 0, 0)])
    write_table(drv, 0x30000, [(0x31000, 16, IND, 0)])
    bad_chain(drv, {0: (0x30000, 16, IND, 0)})
    expect_chain_error(drv, q, R.NESTED_INDIRECT)


def test_indirect_loop() -> None:
    drv, q = setup(8)
    write_table(drv, 0x30000, [(0x10000, 4, N, 1), (0x10000, 4, N, 0)])
    bad_chain(drv, {0: (0x30000, 32, IND, 0)})
    expect_chain_error(drv, q, R.LOOP)


def test_indirect_next_out_of_range() -> None:
    drv, q = setup(8)
    write_table(drv, 0x30000, [(0x10000, 4, N, 1), (0x10000, 4, N, 2)])
    bad_chain(drv, {0: (0x30000, 32, IND, 0)})
    expect_chain_error(drv, q, R.NEXT_OUT_OF_RANGE)


def test_indirect_read_after_write() -> None:
    drv, q = setup(8)
    write_table(drv, 0x30000, [(0x10000, 4, W | N, 1), (0x10000, 4, 0, 0)])
    bad_chain(drv, {0: (0x30000, 32, IND, 0)})
    expect_chain_error(drv, q, R.READ_AFTER_WRITE)


def test_indirect_table_may_exceed_the_queue_size_and_is_unaligned() -> None:
    drv, q = setup(4)
    entries = [(0x10000 + k, 1, N, k + 1) for k in range(19)] + [(0x20000, 100, W, 0)]
    write_table(drv, 0x30008, entries)
    bad_chain(drv, {0: (0x30008, 16 * 20, IND | W, 0)})  # the WRITE flag here is ignored
    chain = q.pop()
    assert chain is not None and chain.read_len == 19 and chain.write_len == 100


def test_indirect_at_the_end_of_a_direct_chain() -> None:
    drv, q = setup(8)
    drv.write(0x10000, b"abcdef")
    write_table(drv, 0x30000, [(0x10004, 2, N, 1), (0x20000, 8, W, 0)])
    bad_chain(drv, {0: (0x10000, 4, N, 1), 1: (0x30000, 32, IND, 0)})
    chain = q.pop()
    assert chain is not None
    assert chain_bytes(chain.readable) == b"abcdef" and chain.write_len == 8


# -- indexes, wrap-around, resume -------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 65530, 65535, 32768])
def test_wrap_around_never_returns_a_head_twice(start: int) -> None:
    drv, q = setup(8, start=start)
    seen = 0
    for round_ in range(40):
        heads = [drv.add([], [4]) for _ in range(1 + round_ % 8)]
        got = []
        while (c := q.pop()) is not None:
            got.append(c.head)
            q.push(c.head, 1)
        assert got == heads
        q.publish()
        used = drv.get_used()  # raises "id N is not a head!" on any mistake
        assert [u.head for u in used] == heads
        seen += len(heads)
    assert q.last_avail_idx == (start + seen) & 0xFFFF == q.used_idx == drv.used_idx()


def test_resume_from_set_vring_base() -> None:
    drv, q = setup(8, start=100)
    drv.add([b"a"])
    drv.add([b"b"])
    c = q.pop()
    assert c is not None
    q.push(c.head, 0)
    q.publish()
    drv.get_used()
    base = q.last_avail_idx  # GET_VRING_BASE
    q2 = SplitQueue(drv.mem, 8, drv.desc_uva, drv.avail_uva, drv.used_uva,
                    event_idx=False, indirect=True, last_avail_idx=base)
    assert q2.used_idx == 101  # read from the ring
    c2 = q2.pop()
    assert c2 is not None and chain_bytes(c2.readable) == b"b"
    q2.push(c2.head, 0)
    q2.publish()
    assert [u.head for u in drv.get_used()] == [c2.head]


def test_setting_last_avail_idx() -> None:
    drv, q = setup(8)
    drv.add([b"a"])
    drv.add([b"b"])
    q.last_avail_idx = 1
    c = q.pop()
    assert c is not None and chain_bytes(c.readable) == b"b"
    assert q.pop() is None


def test_used_elements_land_at_used_idx_mod_size() -> None:
    drv, q = setup(4, start=65534)
    for _ in range(3):
        drv.add([b"x"])
    chains = [q.pop() for _ in range(3)]
    for c in reversed(chains):  # completion order need not match avail order
        assert c is not None
        q.push(c.head, 7)
    q.publish()
    assert drv.used_idx() == 1
    used = drv.get_used()
    assert [u.head for u in used] == [c.head for c in reversed(chains) if c is not None]


# -- unpop and pop_many ----------------------------------------------------------------------


def test_unpop_gives_chains_back_in_order() -> None:
    drv, q = setup(8)
    heads = [drv.add([], [100]) for _ in range(3)]
    chains = [q.pop() for _ in range(3)]
    q.unpop(3)
    assert [c.head for c in iter(q.pop, None) if c is not None] == heads
    assert all(c is not None for c in chains)


def test_unpop_after_partial_completion() -> None:
    drv, q = setup(8)
    heads = [drv.add([], [100]) for _ in range(3)]
    a, b, _ = (q.pop() for _ in range(3))
    assert a is not None and b is not None
    q.push(a.head, 50)
    q.push(b.head, 50)
    q.unpop(1)
    c = q.pop()
    assert c is not None and c.head == heads[2]


def test_unpop_refuses_completed_chains() -> None:
    drv, q = setup(8)
    for _ in range(2):
        drv.add([], [100])
    a = q.pop()
    b = q.pop()
    assert a is not None and b is not None
    q.push(b.head, 0)
    with pytest.raises(UnpopError):
        q.unpop(1)
    with pytest.raises(UnpopError):
        q.unpop(-1)


def test_unpop_refuses_to_cross_a_bad_chain() -> None:
    drv, q = setup(8)
    drv.add([], [100])
    bad_chain(drv, {7: (0x10000, 4, N, 9)}, head=7)
    drv.add([], [100])
    assert q.pop() is not None
    with pytest.raises(ChainError):
        q.pop()
    assert q.pop() is not None
    q.unpop(1)
    with pytest.raises(UnpopError):
        q.unpop(2)


def test_pop_many_takes_enough_or_nothing() -> None:
    drv, q = setup(8)
    heads = [drv.add([], [1000]) for _ in range(3)]
    assert q.pop_many(5000, 8) is None
    assert q.pending() == 3
    chains = q.pop_many(1500, 8)
    assert chains is not None and [c.head for c in chains] == heads[:2]
    assert q.pop_many(1, 0) is None
    q.unpop(2)
    chains = q.pop_many(3000, 3)
    assert chains is not None and len(chains) == 3


def test_pop_many_limits_the_number_of_chains() -> None:
    drv, q = setup(8)
    for _ in range(4):
        drv.add([], [100])
    assert q.pop_many(300, 2) is None
    assert q.pending() == 4


def test_pop_many_hands_over_chains_taken_before_a_bad_one() -> None:
    drv, q = setup(8)
    good = drv.add([], [100])
    bad_chain(drv, {7: (0x10000, 4, N, 9)}, head=7)
    with pytest.raises(ChainError) as err:
        q.pop_many(1000, 8)
    assert [c.head for c in err.value.popped] == [good]
    for head in [good, 7]:
        q.push(head, 0)
    q.publish()
    assert sorted(u.head for u in drv.get_used()) == sorted([good, 7])


# -- interrupts and kicks --------------------------------------------------------------------


def test_vring_need_event() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 3)
    assert vring_need_event(65535, 2, 65534)  # across the wrap
    assert not vring_need_event(10, 10, 9)


def test_interrupt_suppression_without_event_idx() -> None:
    drv, q = setup(8)
    drv.add([b"x"])
    c = q.pop()
    assert c is not None
    assert q.needs_interrupt() is True  # first ask with nothing new: still allowed once
    assert q.needs_interrupt() is False  # nothing new since
    q.push(c.head, 0)
    q.publish()
    drv.set_no_interrupt(True)
    assert q.needs_interrupt() is False
    drv.add([b"y"])
    c = q.pop()
    assert c is not None
    q.push(c.head, 0)
    q.publish()
    drv.set_no_interrupt(False)
    assert q.needs_interrupt() is True


def test_interrupt_suppression_with_event_idx() -> None:
    drv, q = setup(8, event_idx=True, start=65533)
    for _ in range(6):
        drv.add([b"x"])
    chains = [q.pop() for _ in range(6)]
    drv.set_used_event(65535)  # interrupt me once you pass 65535
    q.push(chains[0].head, 0)  # type: ignore[union-attr]
    q.publish()
    assert q.needs_interrupt() is True  # first signal after start is always sent
    q.push(chains[1].head, 0)  # type: ignore[union-attr]
    q.publish()  # used idx 65535: not past the event yet
    assert q.needs_interrupt() is False
    q.push(chains[2].head, 0)  # type: ignore[union-attr]
    q.publish()  # 0: crossed 65535
    assert q.needs_interrupt() is True
    q.push(chains[3].head, 0)  # type: ignore[union-attr]
    q.publish()
    assert q.needs_interrupt() is False
    assert len(drv.get_used()) == 4


def test_kick_suppression_with_event_idx() -> None:
    drv, q = setup(8, event_idx=True)
    drv.add([b"a"])
    assert q.pop() is not None
    assert q.enable_notifications() is False
    assert drv.avail_event() == 1
    old = drv.avail_idx
    drv.add([b"b"])
    assert drv.needs_kick(old)
    q.disable_notifications()
    old = drv.avail_idx
    drv.add([b"c"])
    assert not drv.needs_kick(old)  # avail_event still 1: no kick while we drain
    assert q.enable_notifications() is True  # chains arrived meanwhile: drain again


def test_kick_suppression_without_event_idx() -> None:
    drv, q = setup(8)
    q.disable_notifications()
    assert drv.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    assert not drv.needs_kick(0)
    assert q.enable_notifications() is False
    assert drv.used_flags() == 0


# -- properties ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 0x11000), st.integers(0, (1 << 64) - 1)),
            st.one_of(st.integers(0, 0x2000), st.integers(0, (1 << 32) - 1)),
            st.integers(0, 0xFFFF),
            st.integers(0, 20),
        ),
        min_size=16,
        max_size=16,
    ),
    heads=st.lists(st.integers(0, 17), min_size=1, max_size=20),
    indirect=st.booleans(),
)
def test_walker_on_arbitrary_tables(
    table: list[tuple[int, int, int, int]], heads: list[int], indirect: bool
) -> None:
    mem, bufs = make_memory(((0, 0x8000), (0x8000, 0x8000)))
    # The descriptor table doubles as data and indirect tables: nothing stops a guest.
    drv = FakeDriver(mem, 16, base_gpa=0x0000, data_gpa=0x2000)
    q = drv.queue(indirect=indirect, max_chain_bytes=0x6000)
    for i, (addr, length, flags, nxt) in enumerate(table):
        drv.write_desc(i, addr, length, flags, nxt)
    for h in heads[:16]:
        drv.post(h)
    backing = {id(b) for b in bufs}
    while True:
        try:
            chain = q.pop()
        except ChainError as err:
            assert 0 <= err.head < 16
            continue
        except RingError as err:
            assert err.reason is RingErrorReason.HEAD_OUT_OF_RANGE
            break
        if chain is None:
            break
        assert chain.read_len == sum(len(v) for v in chain.readable)
        assert chain.write_len == sum(len(v) for v in chain.writable)
        assert chain.read_len + chain.write_len <= 0x6000
        for v in chain.readable + chain.writable:
            assert id(v.obj) in backing and len(v) > 0


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 0xFFFF),
    ops=st.lists(st.tuples(st.sampled_from("apcu"), st.integers(1, 8)), max_size=60),
)
def test_model_device_and_driver_agree(start: int, ops: list[tuple[str, int]]) -> None:
    """Random adds, pops, completions and unpops across the u16 wrap: every posted head comes
    back exactly once, in avail order, and the driver never sees an id that is not a head."""
    drv, q = setup(8, start=start)
    posted: list[int] = []
    popped: list[int] = []  # popped, not completed, in pop order
    returned: list[int] = []
    for op, n in ops:
        if op == "a":
            for _ in range(min(n, len(drv.free))):
                posted.append(drv.add([], [8]))
        elif op == "p":
            for _ in range(n):
                c = q.pop()
                if c is None:
                    break
                assert c.head == posted.pop(0)
                popped.append(c.head)
        elif op == "c" and popped:
            for head in popped[:n]:
                q.push(head, 1)
                returned.append(head)
            del popped[:n]
            q.publish()
        elif op == "u":
            k = min(n, len(popped))
            q.unpop(k)
            if k:
                posted[:0] = popped[-k:]
                del popped[-k:]
        assert [u.head for u in drv.get_used()] == returned
        returned.clear()


def test_errors_are_virtqueue_errors() -> None:
    assert issubclass(ChainError, VirtqueueError)
    assert issubclass(RingError, VirtqueueError)
    assert issubclass(UnpopError, VirtqueueError)
    assert isinstance(GuestMemory, type)
