"""vhost-user codec and back-end session, driven by a fake QEMU over a socketpair."""

from __future__ import annotations

import gc
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vhost_frontend import FakeFrontend, FrontendError
from vionet import vhost_session
from vionet.guestmem import GuestMemory
from vionet.vhost_session import Session
from vionet.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    Header,
    MemRegion,
    MemTable,
    Message,
    Reason,
    Request,
    VhostUserError,
    VringAddr,
    VringFile,
    VringState,
    decode_request,
    encode,
    encode_reply,
    recv_frame,
    send_message,
)
from vionet.virtqueue import SplitQueue
from vmd_py.virtio_defs import NetF

OFFERED = int(
    NetF.VERSION_1
    | NetF.PROTOCOL_FEATURES
    | NetF.CSUM
    | NetF.GUEST_CSUM
    | NetF.MRG_RXBUF
    | NetF.RING_EVENT_IDX
    | NetF.RING_INDIRECT_DESC
)
ACKED = int(NetF.VERSION_1 | NetF.PROTOCOL_FEATURES | NetF.CSUM | NetF.RING_EVENT_IDX)


def fd_count(*, collect: bool = True) -> int:
    """Open fds, after collecting garbage that may still hold some from earlier tests."""
    if collect:
        gc.collect()
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@dataclass
class Started:
    index: int
    queue: SplitQueue
    kick: int
    call: int | None


@dataclass
class RecordingHooks:
    """DeviceHooks that remember every call; queue_stopped reports the queue's index."""

    features: list[int] = field(default_factory=list)
    started: list[Started] = field(default_factory=list)
    call_changes: list[tuple[int, int | None]] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    resets: int = 0
    running: dict[int, Started] = field(default_factory=dict)

    def features_set(self, acked: int) -> None:
        self.features.append(acked)

    def queue_started(
        self, index: int, queue: SplitQueue, kick_fd: int, call_fd: int | None
    ) -> None:
        assert index not in self.running, "started twice without a stop"
        rec = Started(index, queue, kick_fd, call_fd)
        self.started.append(rec)
        self.running[index] = rec

    def queue_call_changed(self, index: int, call_fd: int | None) -> None:
        assert index in self.running
        self.call_changes.append((index, call_fd))
        self.running[index].call = call_fd

    def queue_stopped(self, index: int) -> int:
        self.stopped.append(index)
        return self.running.pop(index).queue.last_avail_idx

    def reset(self) -> None:
        assert not self.running, "reset with rings still running"
        self.resets += 1


@dataclass
class Run:
    session: Session
    hooks: RecordingHooks
    errors: list[VhostUserError] = field(default_factory=list)


def run_frontend(
    fn: Callable[[FakeFrontend, Run], object],
    *,
    offered: int = OFFERED,
    reply_ack: bool = False,
    **session_kw: Any,
) -> Run:
    """Serve a session on one end of a socketpair while ``fn`` plays QEMU on the other.

    The back-end carries on after non-fatal refusals (recording them), as a lenient caller
    would; the run ends when the front-end hangs up.
    """
    hooks = RecordingHooks()
    run = Run(Session(hooks, offered_features=offered, **session_kw), hooks)
    front_sock, back_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frontend = FakeFrontend(front_sock, reply_ack=reply_ack)

    async def backend() -> None:
        with back_sock:
            while True:
                try:
                    await run.session.serve(back_sock)
                    return
                except VhostUserError as err:
                    run.errors.append(err)
                    if err.fatal:
                        run.session.close()
                        return

    def play() -> None:
        try:
            fn(frontend, run)
        finally:
            frontend.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend)
            await trio.to_thread.run_sync(play)

    trio.run(main)
    return run


# --- the QEMU sequence -------------------------------------------------------------------


def test_qemu_sequence_starts_translated_rings(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[Any, ...]] = []
    real = SplitQueue

    def spy(*args: Any, **kw: Any) -> SplitQueue:
        made.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(vhost_session, "SplitQueue", spy)

    def play(fe: FakeFrontend, run: Run) -> None:
        offered = fe.start(ACKED, queue_size=256)
        assert offered["features"] == OFFERED
        assert offered["protocol_features"] == int(vhost_session.DEFAULT_PROTOCOL_FEATURES)
        assert run.hooks.features == [ACKED]
        assert [s.index for s in run.hooks.started] == [0, 1]
        for rec, (args, kw) in zip(run.hooks.started, made, strict=True):
            ring = fe.rings[rec.index]
            mem, size, desc, avail, used = args
            assert (size, desc, avail, used) == (
                256, fe.uva(ring.desc), fe.uva(ring.avail), fe.uva(ring.used),
            )
            assert kw["event_idx"] is True and kw["indirect"] is False
            assert rec.queue.last_avail_idx == 0
            # The back-end's view of the ring is the front-end's RAM.
            assert isinstance(mem, GuestMemory)
            fe.ram[ring.desc : ring.desc + 4] = b"\xde\xad\xbe\xef"
            assert bytes(mem.uva(desc, 4)) == b"\xde\xad\xbe\xef"
            mem.gpa(ring.used, 2)[:] = b"\x07\x00"
            assert fe.ram[ring.used : ring.used + 2] == b"\x07\x00"
            # Kick and call are the front-end's eventfds.
            fe.kick_queue(rec.index)
            assert os.eventfd_read(rec.kick) == 1
            assert rec.call is not None
            # The call fd that came after the ring started got one interrupt: one the device
            # raised on the earlier fd (after a reconnect) would otherwise be lost.
            assert os.eventfd_read(fe.call[rec.index]) == 1
            os.eventfd_write(rec.call, 3)
            assert os.eventfd_read(fe.call[rec.index]) == 3
        # The guest stops the device; the bases are where the device stopped.
        run.hooks.running[0].queue.last_avail_idx = 17
        run.hooks.running[1].queue.last_avail_idx = 0xFFFF
        assert fe.stop() == [17, 0xFFFF]
        assert run.hooks.stopped == [0, 1] and not run.hooks.running
        # And starts it again from those bases.
        fe.setup_queue(0, 256, base=17)
        fe.set_vring_enable(0, True)
        fe.sync()
        assert run.hooks.running[0].queue.last_avail_idx == 17

    run = run_frontend(play)
    assert run.errors == []
    assert run.hooks.resets == 1  # the hang-up
    assert not run.hooks.running


def test_reply_ack_acks_and_nacks() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)  # every request without a reply body now waits for a 0 ack
        assert run.session.protocol_features & (1 << 3)
        with pytest.raises(FrontendError, match="failed: 1"):
            fe.call_(Request.SET_VRING_NUM, VringState(0, 3))
        with pytest.raises(FrontendError, match="failed: 1"):
            fe.call_(Request.SET_LOG_FD)  # unsupported, refused by the decoder
        fe.sync()

    run = run_frontend(play, reply_ack=True)
    assert [e.reason for e in run.errors] == [Reason.RING_BUSY, Reason.UNSUPPORTED]
    assert run.session.errors == {"ring_busy": 1, "unsupported": 1}


def test_without_protocol_features_rings_enable_on_set_features() -> None:
    acked = int(NetF.VERSION_1 | NetF.CSUM)

    def play(fe: FakeFrontend, run: Run) -> None:
        fe.get_features()
        fe.set_owner()
        fe.set_mem_table()
        for i in range(2):
            fe.setup_queue(i, 128)
        fe.sync()
        assert run.hooks.started == []  # started but not yet enabled
        fe.set_features(acked)
        fe.sync()
        assert [s.index for s in run.hooks.started] == [0, 1]
        assert run.session.ring_enabled(0) and run.session.ring_enabled(1)

    run = run_frontend(play)
    assert run.errors == [] and run.hooks.features == [acked]


def test_enable_and_disable_gate_the_device() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.set_features(ACKED)
        fe.set_mem_table()
        fe.setup_queue(0, 64)
        fe.sync()
        assert not run.session.ring_running(0) and run.hooks.started == []
        fe.set_vring_enable(0, True)
        fe.sync()
        assert run.session.ring_running(0)
        run.hooks.running[0].queue.last_avail_idx = 5
        fe.set_vring_enable(0, False)
        fe.sync()
        assert run.hooks.stopped == [0] and not run.session.ring_running(0)
        assert fe.get_vring_base(0) == 5  # kept from the stop
        assert fe.get_vring_base(1) == 0  # never configured

    run = run_frontend(play)
    assert run.errors == []


def test_call_fd_change_reaches_running_queue() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)
        old = run.hooks.running[1].call
        assert old is not None and fd_is_open(old)
        new_front = fe.set_vring_call(1)
        fe.sync()
        index, new = run.hooks.call_changes[-1]
        assert index == 1 and new is not None and new != old
        assert not fd_is_open(old)  # the replaced fd is closed once the new one is handed over
        assert os.eventfd_read(new_front) == 1  # a new call fd on a running ring is signalled
        os.eventfd_write(new, 1)
        assert os.eventfd_read(new_front) == 1
        fe.call_(Request.SET_VRING_CALL, VringFile(1, True))  # no fd: polling
        fe.sync()
        assert run.hooks.call_changes[-1] == (1, None)
        # Checked by number, not by counting this process's fds: a thread left over from an
        # earlier test may close one of its own meanwhile (the count was off by one at times).
        assert not fd_is_open(new)
        assert fd_is_open(new_front)

    run = run_frontend(play)
    assert run.errors == []


def test_new_mem_table_restarts_running_rings() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)
        old_mem = run.session.memory
        run.hooks.running[0].queue.last_avail_idx = 9
        before = fd_count()
        fe.set_mem_table()
        fe.sync()
        assert run.hooks.stopped == [0, 1]
        assert [s.index for s in run.hooks.started] == [0, 1, 0, 1]
        assert run.hooks.running[0].queue.last_avail_idx == 9
        assert run.session.memory is not old_mem
        assert run.hooks.running[0].queue.mem is run.session.memory
        # The old queues' ring views keep the old mapping (and mmap's fd dup) alive;
        # it goes as soon as the device drops them.
        assert fd_count() == before + 1
        del run.hooks.started[:2]
        assert fd_count() == before

    run = run_frontend(play)
    assert run.errors == []


def test_reset_device_stops_rings_and_forgets_them() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)
        fe.call_(Request.RESET_DEVICE)
        fe.sync()
        assert run.hooks.stopped == [0, 1] and run.hooks.resets == 1
        assert run.session.acked_features == 0
        assert fe.get_vring_base(0) == 0
        fe.set_features(ACKED)
        for i in range(2):
            fe.setup_queue(i, 256)
            fe.set_vring_enable(i, True)
        fe.sync()
        assert len(run.hooks.running) == 2

    run = run_frontend(play)
    assert run.errors == [] and run.hooks.resets == 2


def test_reset_owner_only_disables_rings() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)
        run.hooks.running[1].queue.last_avail_idx = 4
        fe.call_(Request.RESET_OWNER)
        fe.sync()
        assert run.hooks.stopped == [0, 1] and run.hooks.resets == 0
        assert run.session.acked_features == ACKED
        fe.set_vring_enable(1, True)
        fe.sync()
        assert run.hooks.running[1].queue.last_avail_idx == 4

    run = run_frontend(play)
    assert run.errors == []


def test_disconnect_releases_every_fd_and_mapping() -> None:
    before = fd_count()
    run = run_frontend(lambda fe, run: fe.start(ACKED))
    assert run.hooks.resets == 1 and run.session.memory is None
    run.hooks.started.clear()  # the device drops its queues (and their ring views)
    assert fd_count() == before


def test_queue_num_and_rarp() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        assert fe.query_u64(Request.GET_QUEUE_NUM) == 1
        fe.call_(Request.SEND_RARP, 0x0000_5254_0012_3456)
        fe.sync()

    assert run_frontend(play).errors == []


# --- hostile messages --------------------------------------------------------------------


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _mem(*regions: MemRegion) -> bytes:
    return encode(Request.SET_MEM_TABLE, MemTable(regions))


def _mem_header(nregions: int, size: int | None = None) -> bytes:
    body = struct.pack("=II", nregions, 0) + bytes(32 * nregions)
    return Header(Request.SET_MEM_TABLE, VERSION, len(body) if size is None else size).pack()


@dataclass
class Bad:
    """A malformed request: raw bytes (or a builder needing the front-end) and fd count."""

    reason: Reason
    data: bytes | Callable[[FakeFrontend], bytes]
    nfds: int = 0
    memfd: bool = False  # send the guest RAM memfd (dup) instead of eventfds


def _region(fe: FakeFrontend, size: int, uva: int = 0, gpa: int = 0) -> MemRegion:
    return MemRegion(gpa, size, fe.uva(uva), 0)


BAD: dict[str, Bad] = {
    "set_features_short": Bad(
        Reason.BAD_SIZE, Header(Request.SET_FEATURES, VERSION, 4).pack() + b"\0" * 4
    ),
    "get_features_with_body": Bad(
        Reason.BAD_SIZE, Header(Request.GET_FEATURES, VERSION, 8).pack() + b"\0" * 8
    ),
    "state_too_long": Bad(
        Reason.BAD_SIZE, Header(Request.SET_VRING_NUM, VERSION, 12).pack() + b"\0" * 12
    ),
    "mem_table_nine_regions": Bad(
        Reason.BAD_PAYLOAD,
        _mem_header(9) + struct.pack("=II", 9, 0) + bytes(32 * 9),
        nfds=1,
    ),
    "mem_table_zero_regions": Bad(
        Reason.BAD_PAYLOAD, _mem_header(0) + struct.pack("=II", 0, 0)
    ),
    "mem_table_size_disagrees": Bad(
        Reason.BAD_SIZE, _mem_header(1, 8 + 32 + 8) + struct.pack("=II", 1, 0) + bytes(40),
        nfds=1,
    ),
    "too_many_fds": Bad(Reason.BAD_FDS, encode(Request.SET_OWNER), nfds=9),
    "fds_beyond_room": Bad(Reason.CTRUNC, encode(Request.SET_OWNER), nfds=40),
    "mem_table_more_fds_than_regions": Bad(
        Reason.BAD_FDS, lambda fe: _mem(_region(fe, 4096)), nfds=2
    ),
    "mem_table_fewer_fds_than_regions": Bad(
        Reason.BAD_FDS,
        lambda fe: _mem(_region(fe, 4096), _region(fe, 4096, 8192, 8192)),
        nfds=1,
    ),
    "mem_table_past_end_of_memfd": Bad(
        Reason.BAD_MEM_TABLE, lambda fe: _mem(_region(fe, fe.ram_size + 4096)), nfds=1,
        memfd=True,
    ),
    "mem_table_overlapping_uva": Bad(
        Reason.BAD_MEM_TABLE,
        lambda fe: _mem(_region(fe, 8192), _region(fe, 8192, 4096, 1 << 30)),
        nfds=2, memfd=True,
    ),
    "mem_table_eventfd": Bad(Reason.BAD_MEM_TABLE, lambda fe: _mem(_region(fe, 4096)), nfds=1),
    "ring_addr_outside_memory": Bad(
        Reason.UNMAPPED,
        lambda fe: encode(
            Request.SET_VRING_ADDR,
            VringAddr(0, 0, fe.uva(fe.ram_size), fe.uva(0x2000), fe.uva(0x1000), 0),
        ),
    ),
    "ring_addr_straddles_end": Bad(
        Reason.UNMAPPED,
        lambda fe: encode(
            Request.SET_VRING_ADDR,
            VringAddr(0, 0, fe.uva(fe.ram_size - 16), fe.uva(0x2000), fe.uva(0x1000), 0),
        ),
    ),
    "ring_addr_misaligned": Bad(
        Reason.UNMAPPED,
        lambda fe: encode(
            Request.SET_VRING_ADDR,
            VringAddr(0, 0, fe.uva(8), fe.uva(0x8000), fe.uva(0x9000), 0),
        ),
    ),
    "ring_addr_log_flag": Bad(
        Reason.BAD_PAYLOAD,
        lambda fe: encode(
            Request.SET_VRING_ADDR,
            VringAddr(0, 1, fe.uva(0), fe.uva(0x8000), fe.uva(0x9000), 0),
        ),
    ),
    "vring_num_zero": Bad(Reason.BAD_NUM, encode(Request.SET_VRING_NUM, VringState(0, 0))),
    "vring_num_not_power_of_two": Bad(
        Reason.BAD_NUM, encode(Request.SET_VRING_NUM, VringState(0, 100))
    ),
    "vring_num_too_big": Bad(Reason.BAD_NUM, encode(Request.SET_VRING_NUM, VringState(0, 65536))),
    "vring_base_too_big": Bad(
        Reason.BAD_NUM, encode(Request.SET_VRING_BASE, VringState(0, 0x10000))
    ),
    "vring_enable_two": Bad(Reason.BAD_NUM, encode(Request.SET_VRING_ENABLE, VringState(0, 2))),
    "vring_index_out_of_range": Bad(
        Reason.BAD_INDEX, encode(Request.SET_VRING_NUM, VringState(2, 256))
    ),
    "kick_index_out_of_range": Bad(
        Reason.BAD_INDEX, encode(Request.SET_VRING_KICK, VringFile(200, False)), nfds=1
    ),
    "unknown_request": Bad(Reason.UNKNOWN_REQUEST, Header(99, VERSION, 0).pack()),
    "request_zero": Bad(Reason.UNKNOWN_REQUEST, Header(0, VERSION, 0).pack(), nfds=1),
    "unsupported_log_base": Bad(
        Reason.UNSUPPORTED, encode(Request.SET_LOG_BASE, 0), nfds=1
    ),
    "fd_on_request_taking_none": Bad(Reason.BAD_FDS, encode(Request.SET_OWNER), nfds=1),
    "fd_on_get_vring_base": Bad(
        Reason.BAD_FDS, encode(Request.GET_VRING_BASE, VringState(0, 0)), nfds=1
    ),
    "kick_without_fd": Bad(Reason.BAD_FDS, encode(Request.SET_VRING_KICK, VringFile(0, False))),
    "kick_nofd_with_fd": Bad(
        Reason.BAD_FDS, encode(Request.SET_VRING_KICK, VringFile(0, True)), nfds=1
    ),
    "kick_polling": Bad(Reason.NO_POLLING, encode(Request.SET_VRING_KICK, VringFile(0, True))),
    "call_reserved_bits": Bad(
        Reason.BAD_PAYLOAD, encode(Request.SET_VRING_CALL, 1 << 9), nfds=1
    ),
    "version_two": Bad(Reason.BAD_FLAGS, encode(Request.SET_OWNER, flags=2)),
    "reply_bit_on_request": Bad(
        Reason.BAD_FLAGS, encode(Request.SET_OWNER, flags=VERSION | FLAG_REPLY)
    ),
    "unknown_flag_bits": Bad(Reason.BAD_FLAGS, encode(Request.SET_OWNER, flags=VERSION | 0x10)),
    "features_not_offered": Bad(
        Reason.BAD_FEATURES, encode(Request.SET_FEATURES, OFFERED | NetF.HOST_TSO4)
    ),
    "protocol_features_not_offered": Bad(
        Reason.BAD_PROTOCOL_FEATURES, encode(Request.SET_PROTOCOL_FEATURES, 1 << 16)
    ),
    "num_on_running_ring": Bad(
        Reason.RING_BUSY, encode(Request.SET_VRING_NUM, VringState(1, 256))
    ),
    "base_on_running_ring": Bad(
        Reason.RING_BUSY, encode(Request.SET_VRING_BASE, VringState(1, 0))
    ),
}


@pytest.mark.hostile
@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_request_is_refused_and_leaks_nothing(name: str) -> None:
    bad = BAD[name]

    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED, num_queues=2)
        # Ring 0 stopped (so NUM/BASE/ADDR on it are legal), ring 1 still running.
        fe.get_vring_base(0)
        data = bad.data(fe) if callable(bad.data) else bad.data
        fe.sync()
        baseline = fd_count()
        fds = [os.dup(fe.memfd) for _ in range(bad.nfds)] if bad.memfd else _eventfds(bad.nfds)
        fe.send_raw(data, fds)
        for fd in fds:
            os.close(fd)
        # The session is still in step and answering.
        fe.sync()
        assert fd_count() == baseline
        assert run.session.ring_running(1)

    run = run_frontend(play)
    assert [e.reason for e in run.errors] == [bad.reason]
    assert not run.errors[0].fatal
    assert run.session.errors == {bad.reason.value: 1}


@pytest.mark.hostile
def test_oversized_header_is_fatal() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.get_features()
        fds = _eventfds(2)
        fe.send_raw(Header(Request.SET_OWNER, VERSION, MAX_PAYLOAD + 1).pack(), fds)
        for fd in fds:
            os.close(fd)
        assert fe.sock.recv(1) == b""  # the back-end hung up

    before = fd_count()
    run = run_frontend(play)
    assert [(e.reason, e.fatal) for e in run.errors] == [(Reason.OVERSIZED, True)]
    assert fd_count() == before


@pytest.mark.hostile
def test_truncated_message_is_fatal() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.send_raw(Header(Request.SET_FEATURES, VERSION, 8).pack() + b"\0\0", _eventfds(0))
        fe.sock.shutdown(socket.SHUT_WR)
        assert fe.sock.recv(1) == b""

    run = run_frontend(play)
    assert [(e.reason, e.fatal) for e in run.errors] == [(Reason.TRUNCATED, True)]


@pytest.mark.hostile
def test_set_features_refusal_is_nacked_not_applied() -> None:
    def play(fe: FakeFrontend, run: Run) -> None:
        fe.start(ACKED)
        with pytest.raises(FrontendError, match="failed: 1"):
            fe.set_features(ACKED | NetF.GUEST_TSO4)
        assert run.session.acked_features == ACKED

    run = run_frontend(play, reply_ack=True)
    assert [e.reason for e in run.errors] == [Reason.BAD_FEATURES]


# --- codec -------------------------------------------------------------------------------


def _frame(data: bytes, fds: list[int] | None = None) -> Frame:
    return Frame(Header.unpack(data[:HEADER_SIZE]), data[HEADER_SIZE:], fds or [])


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (Request.GET_FEATURES, None, 0),
        (Request.SET_FEATURES, OFFERED, 0),
        (Request.SET_VRING_NUM, VringState(1, 1024), 0),
        (Request.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), 0),
        (Request.SET_VRING_KICK, VringFile(1, False), 1),
        (Request.SET_VRING_CALL, VringFile(0, True), 0),
        (Request.SET_MEM_TABLE, MemTable((MemRegion(0, 1 << 20, 1 << 40, 0),) * 8), 8),
    ],
)
def test_codec_round_trip(request_: Request, payload: Any, nfds: int) -> None:
    fds = _eventfds(nfds)
    msg = decode_request(_frame(encode(request_, payload, flags=VERSION | FLAG_NEED_REPLY), fds))
    assert (msg.request, msg.payload, msg.fds, msg.need_reply) == (request_, payload, fds, True)
    for fd in fds:
        os.close(fd)


def test_reply_encoding() -> None:
    data = encode_reply(Request.GET_VRING_BASE, VringState(1, 300))
    assert Header.unpack(data[:HEADER_SIZE]) == Header(11, VERSION | FLAG_REPLY, 8)
    assert VringState.unpack(data[HEADER_SIZE:]) == VringState(1, 300)


def test_decoder_closes_fds_on_refusal() -> None:
    fds = _eventfds(3)
    with pytest.raises(VhostUserError) as info:
        decode_request(_frame(encode(Request.SET_OWNER), list(fds)))
    assert info.value.reason is Reason.BAD_FDS and info.value.request == Request.SET_OWNER
    assert not any(fd_is_open(fd) for fd in fds)


@contextmanager
def _pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def test_recv_reassembles_a_message_split_across_writes() -> None:
    with _pair() as (a, b):
        addr = VringAddr(0, 0, 1, 2, 3, 4)
        data = encode(Request.SET_VRING_ADDR, addr)
        for start, end in ((0, 5), (5, 30), (30, len(data))):
            a.sendall(data[start:end])
        msg = decode_request(recv_frame(b))
        assert (msg.request, msg.payload, msg.fds) == (Request.SET_VRING_ADDR, addr, [])


def test_recv_collects_fds_sent_with_a_later_chunk() -> None:
    with _pair() as (a, b):
        data = encode(Request.SET_VRING_KICK, VringFile(1, False))
        a.sendall(data[:4])
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        send_message(a, data[4:], [fd])
        os.close(fd)
        msg = decode_request(recv_frame(b))
        assert msg.payload == VringFile(1, False) and len(msg.fds) == 1
        os.close(msg.fds[0])


@pytest.mark.hostile
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda req, flags, body: Header(req, flags, len(body)).pack() + body,
            st.integers(0, 45),
            st.sampled_from([0, 1, 1, 1, 5, 9, 0xD, 0x11, 0xFFFFFFFF]),
            st.binary(max_size=300),
        ),
    ),
    nfds=st.integers(0, 9),
)
def test_decoder_on_arbitrary_bytes_raises_only_vhost_user_error(data: bytes, nfds: int) -> None:
    fds = _eventfds(nfds) if len(data) >= HEADER_SIZE else []
    if len(data) < HEADER_SIZE:
        data = data.ljust(HEADER_SIZE, b"\0")
    try:
        msg: Message | None = decode_request(_frame(data, list(fds)))
    except VhostUserError:
        msg = None
        assert not any(fd_is_open(fd) for fd in fds)
    if msg is not None:
        assert msg.fds == fds
        for fd in fds:
            os.close(fd)


@pytest.mark.hostile
@settings(max_examples=150, deadline=None)
@given(stream=st.binary(max_size=600), nfds=st.integers(0, 3))
def test_stream_reader_on_arbitrary_bytes(stream: bytes, nfds: int) -> None:
    before = fd_count(collect=False)  # no gc per example: garbage can only lower the count
    with _pair() as (a, b):
        fds = _eventfds(nfds)
        if stream:
            send_message(a, stream, fds)
        for fd in fds:
            os.close(fd)
        a.shutdown(socket.SHUT_WR)
        while True:
            try:
                msg = decode_request(recv_frame(b))
            except EOFError:
                break
            except VhostUserError as err:
                if err.fatal:
                    break
                continue
            for fd in msg.fds:
                os.close(fd)
    assert fd_count(collect=False) <= before


# --- real QEMU ---------------------------------------------------------------------------


class _RecordingSession(Session):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[tuple[int, int]] = []

    def process(self, frame: Frame) -> bytes | None:
        self.seen.append((frame.header.request, len(frame.fds)))
        return super().process(frame)


@pytest.mark.e2e
def test_qemu_handshake_is_accepted(qemu_binary: str, tmp_path: Any) -> None:
    """QEMU's own connect-time sequence (no guest running) passes the strict decoder."""
    path = str(tmp_path / "vhost.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(30)
    hooks = RecordingHooks()
    session = _RecordingSession(hooks, offered_features=OFFERED)
    qemu = subprocess.Popen(
        [
            qemu_binary, "-accel", "tcg", "-m", "64M", "-nographic", "-nodefaults", "-S",
            "-monitor", "none", "-serial", "none",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={path}",
            "-netdev", "vhost-user,id=n0,chardev=c0",
            "-device", "virtio-net-pci,netdev=n0,vectors=0",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        conn, _ = listener.accept()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.serve, conn)
                with trio.fail_after(30):
                    enables = 0
                    while enables < 2:
                        await trio.sleep(0.05)
                        enables = [r for r, _ in session.seen].count(Request.SET_VRING_ENABLE)
                qemu.terminate()  # its hang-up ends serve()

        with conn:
            trio.run(main)
    finally:
        qemu.kill()
        out = qemu.communicate()[0].decode(errors="replace")
        listener.close()
    assert session.errors == {}, out
    requests = [r for r, _ in session.seen]
    assert requests[:5] == [
        Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
        Request.SET_OWNER, Request.GET_FEATURES,
    ]
    assert (Request.SET_VRING_CALL, 1) in session.seen
    assert session.protocol_features == int(vhost_session.DEFAULT_PROTOCOL_FEATURES)
    assert hooks.resets >= 1  # RESET_DEVICE at connect and/or the hang-up
