from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vionet.guestmem import GuestMemory, GuestMemoryError, Region


def _mem(layout: list[tuple[int, int, int]]) -> tuple[GuestMemory, list[bytearray]]:
    bufs = [bytearray(size) for _, size, _ in layout]
    regions = [Region(g, s, u, memoryview(b)) for (g, s, u), b in zip(layout, bufs, strict=True)]
    return GuestMemory(regions), bufs


LAYOUT = [(0, 0x1000, 0x7000_0000), (0x1000, 0x1000, 0x5000_0000), (0x10000, 0x100, 0x9000)]


def test_gpa_and_uva_translate_to_the_same_bytes() -> None:
    mem, bufs = _mem(LAYOUT)
    bufs[1][0x10:0x14] = b"abcd"
    assert bytes(mem.gpa(0x1010, 4)) == b"abcd"
    assert bytes(mem.uva(0x5000_0010, 4)) == b"abcd"
    mem.gpa(0x10000, 2)[:] = b"xy"
    assert bytes(bufs[2][:2]) == b"xy"
    assert mem.uva_to_gpa(0x5000_0010) == 0x1010
    assert mem.gpa_to_uva(0x10080) == 0x9080
    assert mem.gpa_to_uva(0x10) == 0x7000_0010


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x0FFF, 2),  # straddles two regions: gpa() wants one
        (0x2000, 1),  # hole
        (0x100FF, 2),  # runs off the end
        (-1, 1),
        (0, -1),
        ((1 << 64) - 1, 2),  # wraps
        (0x20000, 0),  # empty but nowhere
    ],
)
def test_gpa_refuses_ranges_outside_one_region(addr: int, length: int) -> None:
    mem, _ = _mem(LAYOUT)
    with pytest.raises(GuestMemoryError):
        mem.gpa(addr, length)


def test_zero_length_view_inside_memory() -> None:
    mem, _ = _mem(LAYOUT)
    assert len(mem.gpa(0x10, 0)) == 0
    assert len(mem.gpa(0x1000, 0)) == 0


def test_uva_refuses_gpa_addresses() -> None:
    mem, _ = _mem(LAYOUT)
    with pytest.raises(GuestMemoryError):
        mem.uva(0x10, 4)


def test_gpa_iov_splits_across_adjacent_regions_and_refuses_holes() -> None:
    mem, bufs = _mem(LAYOUT)
    bufs[0][-2:] = b"ab"
    bufs[1][:3] = b"cde"
    iov = mem.gpa_iov(0x0FFE, 5)
    assert [bytes(v) for v in iov] == [b"ab", b"cde"]
    assert mem.gpa_iov(0x10, 0) == []
    with pytest.raises(GuestMemoryError):
        mem.gpa_iov(0x1FFF, 2)  # 0x2000 is a hole
    with pytest.raises(GuestMemoryError):
        mem.gpa_iov(-4, 8)


@pytest.mark.parametrize(
    "layout",
    [
        [(0, 0x1000, 0), (0x800, 0x1000, 0x10000)],  # gpa overlap
        [(0, 0x1000, 0), (0x1000, 0x1000, 0x800)],  # uva overlap
        [(0, 0, 0)],  # empty
        [((1 << 64) - 0x10, 0x20, 0)],  # wraps
        [(k * 0x1000, 0x1000, k * 0x1000) for k in range(9)],  # too many
        [],
    ],
)
def test_bad_region_tables(layout: list[tuple[int, int, int]]) -> None:
    with pytest.raises(GuestMemoryError):
        _mem(layout)


def test_short_or_readonly_buffers_are_refused() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([Region(0, 0x100, 0, memoryview(bytearray(0x80)))])
    with pytest.raises(GuestMemoryError):
        GuestMemory([Region(0, 0x100, 0, memoryview(bytes(0x100)))])


def test_close_lets_the_owner_close_its_mmap() -> None:
    m = mmap.mmap(-1, 0x2000)
    mem = GuestMemory([Region(0x1000, 0x2000, 0x1000, memoryview(m))])
    view = mem.gpa(0x1800, 4)
    view[:] = b"\x01\x02\x03\x04"
    assert m[0x800:0x804] == b"\x01\x02\x03\x04"
    view.release()
    mem.close()
    with pytest.raises(GuestMemoryError):
        mem.gpa(0x1800, 4)
    m.close()  # no BufferError: every export is gone


@settings(max_examples=300, deadline=None)
@given(addr=st.integers(-10, 0x12000), length=st.integers(-2, 0x2100))
def test_views_never_escape_a_region(addr: int, length: int) -> None:
    mem, _ = _mem(LAYOUT)
    try:
        v = mem.gpa(addr, length)
    except GuestMemoryError:
        inside = any(g <= addr and addr + length <= g + s for g, s, _ in LAYOUT)
        assert not inside or length < 0
        return
    assert len(v) == length
    assert any(g <= addr and addr + length <= g + s for g, s, _ in LAYOUT)
    try:
        iov = mem.gpa_iov(addr, length)
    except GuestMemoryError:  # pragma: no cover - a single-region range always splits fine
        raise AssertionError("gpa_iov refused what gpa accepted") from None
    assert sum(len(x) for x in iov) == length
