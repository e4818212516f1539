"""vhost-user back-end state machine, independent of the data path.

Ring life cycle (vhost-user.rst "Ring states"). A ring is *stopped* until it has a kick fd,
*started* from SET_VRING_KICK, and stopped again by GET_VRING_BASE; separately it is
*enabled* by SET_VRING_ENABLE(1), or, when the front-end acks features without
VHOST_USER_F_PROTOCOL_FEATURES, by SET_FEATURES itself. Rings begin disabled, and QEMU
sends SET_VRING_ENABLE before SET_FEATURES, so ENABLE is taken at any time.

The device sees a ring (``queue_started``) only while it is started *and* enabled and
its size, addresses and the memory table are known; anything that leaves that state
(disable, GET_VRING_BASE, reset, disconnect) calls ``queue_stopped`` first, whose return
value becomes the ring's base, so a later start resumes where the device stopped. The
spec's "started but disabled" state, where TX is consumed and dropped, is not modelled:
a disabled ring is left untouched. QEMU only disables a ring on its way to stopping it.

Resets. RESET_OWNER (deprecated) only disables every ring, as the doc recommends.
RESET_DEVICE (QEMU 10 sends it at connect when offered) stops the rings, calls
``reset`` and forgets ring state, fds and acked features; the memory table, protocol
features and ownership stay. A hang-up does the same and also unmaps memory.

Changes applied to a running ring: a new memory table, new ring addresses, new
features or a new kick fd restart it (stop, re-translate, start with a fresh
SplitQueue); a new call fd goes to ``queue_call_changed``. SET_VRING_NUM and
SET_VRING_BASE on a running ring are refused (RING_BUSY), as the kernel's vhost does.

Descriptors: the session owns every fd it receives. Kick and call fds handed to the
device stay valid until ``queue_stopped`` / ``queue_call_changed`` returns; the device
must not close them. Memory-table fds are closed once mapped (mmap keeps a dup of
each); a mapping lives until the table is replaced or the session is closed, and then
until the device drops its last view of it. Regions must lie inside their fd's current
size; a front-end that shrinks an unsealed memfd afterwards can still SIGBUS us (QEMU's
memory-backend-memfd seals by default).

Refusals: every hostile input raises :class:`VhostUserError` (after closing its fds),
counted by reason in ``errors``; nothing else escapes except the hooks' own exceptions.
SET_FEATURES with bits we did not offer is refused the same way: the front-end would
otherwise believe in a device we are not, and the doc lets a back-end drop the connection
on incompatible features, which is the caller's call. With REPLY_ACK negotiated, a
refused request that asked NEED_REPLY is answered with a non-zero status first.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vionet.guestmem import GuestMemory, GuestMemoryError, Region
from vionet.vhost_user import (
    EXPLICIT_REPLY,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    VERSION,
    Frame,
    MemTable,
    Message,
    ProtocolFeature,
    Reason,
    Request,
    VhostUserError,
    VringAddr,
    VringFile,
    VringState,
    arecv_frame,
    asend_message,
    close_fds,
    decode_request,
    encode,
    encode_reply,
)
from vionet.virtqueue import SplitQueue, VirtqueueError
from vmd_py.virtio_defs import NetF

DEFAULT_PROTOCOL_FEATURES = ProtocolFeature.REPLY_ACK | ProtocolFeature.RESET_DEVICE
MAX_QUEUE_SIZE = 32768  # split ring limit (virtio 1.2, 2.7)
_PAGE = mmap.PAGESIZE
_U64_END = 1 << 64
_DESC_SIZE = 16


class DeviceHooks(Protocol):
    def features_set(self, acked: int) -> None: ...

    def queue_started(
        self, index: int, queue: SplitQueue, kick_fd: int, call_fd: int | None
    ) -> None: ...

    def queue_call_changed(self, index: int, call_fd: int | None) -> None: ...

    def queue_stopped(self, index: int) -> int: ...

    def reset(self) -> None: ...


@dataclass
class _Ring:
    num: int | None = None
    addr: VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    enabled: bool = False
    queue: SplitQueue | None = None  # set while the device runs the ring

    def close_fds(self) -> None:
        close_fds([fd for fd in (self.kick, self.call) if fd is not None])
        self.kick = self.call = None


class _Mapping:
    """A memory table: the mmaps behind it and the GuestMemory over them."""

    def __init__(self, maps: list[mmap.mmap], mem: GuestMemory) -> None:
        self.maps = maps
        self.mem = mem

    def close(self) -> None:
        self.mem.close()
        for region in self.mem.regions:
            with contextlib.suppress(BufferError):
                region.buf.release()
        _unmap(self.maps)


def _unmap(maps: list[mmap.mmap]) -> None:
    for mm in maps:
        # A view still alive somewhere keeps its mapping until it goes.
        with contextlib.suppress(BufferError):
            mm.close()


def _err(reason: Reason, msg: Message, detail: str) -> VhostUserError:
    return VhostUserError(reason, detail, request=int(msg.request), flags=msg.flags)


class Session:
    """One vhost-user connection's back-end state."""

    def __init__(
        self,
        hooks: DeviceHooks,
        *,
        offered_features: int,
        offered_protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        num_queues: int = 2,
        max_queue_size: int = MAX_QUEUE_SIZE,
    ) -> None:
        if offered_features & NetF.ACCESS_PLATFORM:
            raise ValueError("ACCESS_PLATFORM needs an IOTLB, which this back-end lacks")
        if offered_protocol_features & ~int(DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.MQ):
            raise ValueError(f"unsupported protocol features {offered_protocol_features:#x}")
        if not 1 <= num_queues <= 256 or not 1 <= max_queue_size <= MAX_QUEUE_SIZE:
            raise ValueError("num_queues or max_queue_size out of range")
        self.hooks = hooks
        self.offered_features = offered_features
        self.offered_protocol_features = offered_protocol_features
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.errors: collections.Counter[str] = collections.Counter()
        self._rings = [_Ring() for _ in range(num_queues)]
        self._mapping: _Mapping | None = None
        self._closed = False
        self._handlers: dict[Request, Callable[[Message, list[int]], int | VringState | None]]
        self._handlers = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.SEND_RARP: self._send_rarp,
        }

    # --- public ----------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory | None:
        return self._mapping.mem if self._mapping else None

    def ring_enabled(self, index: int) -> bool:
        return self._rings[index].enabled

    def ring_running(self, index: int) -> bool:
        return self._rings[index].queue is not None

    def process(self, frame: Frame) -> bytes | None:
        """Decode and handle one frame; return the encoded reply to send, if any."""
        try:
            return self.handle(decode_request(frame))
        except VhostUserError as err:
            self.errors[err.reason.value] += 1
            raise

    def handle(self, msg: Message) -> bytes | None:
        """Handle a decoded request (taking its fds); return the encoded reply, if any.

        Unlike :meth:`process`, refusals are not counted here.
        """
        fds = list(msg.fds)
        msg.fds.clear()
        try:
            if self._closed:
                raise _err(Reason.UNSUPPORTED, msg, "session closed")
            result = self._handlers[msg.request](msg, fds)
        finally:
            close_fds(fds)  # whatever a handler did not take
        if msg.request in EXPLICIT_REPLY:
            assert result is not None
            return encode_reply(msg.request, result)
        if msg.need_reply and self._reply_ack:
            return encode_reply(msg.request, 0)
        return None

    def nack_for(self, err: VhostUserError) -> bytes | None:
        """The REPLY_ACK failure reply a refused request asked for, if it can be given."""
        if err.fatal or err.request is None or err.flags is None:
            return None
        if not err.flags & FLAG_NEED_REPLY or not self._reply_ack:
            return None
        if err.request in {int(r) for r in EXPLICIT_REPLY}:
            return None
        return encode(err.request, 1, flags=VERSION | FLAG_REPLY)

    async def serve(self, sock: socket.socket) -> None:
        """Read and answer requests until the peer hangs up (then close the session).

        Raises VhostUserError on the first refused message, with the session still
        consistent: the caller may drop the connection, or (unless ``err.fatal``) call
        serve again to carry on.
        """
        sock.setblocking(False)
        while True:
            try:
                try:
                    frame = await arecv_frame(sock)
                except VhostUserError as err:
                    self.errors[err.reason.value] += 1
                    raise
                reply = self.process(frame)
            except EOFError:
                self.close()
                return
            except VhostUserError as err:
                nack = self.nack_for(err)
                if nack is not None:
                    await asend_message(sock, nack)
                raise
            if reply is not None:
                await asend_message(sock, reply)

    def close(self) -> None:
        """Disconnect: stop the rings, reset the device, release every fd and mapping."""
        if self._closed:
            return
        self._closed = True
        self._stop_all()
        self.hooks.reset()
        for ring in self._rings:
            ring.close_fds()
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

    # --- helpers ---------------------------------------------------------------------

    @property
    def _reply_ack(self) -> bool:
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def _ring(self, msg: Message, index: int) -> _Ring:
        if not 0 <= index < self.num_queues:
            raise _err(Reason.BAD_INDEX, msg, f"ring {index} of {self.num_queues}")
        return self._rings[index]

    def _event_idx(self) -> bool:
        return bool(self.acked_features & NetF.RING_EVENT_IDX)

    def _check_layout(self, msg: Message, mem: GuestMemory, num: int, addr: VringAddr) -> None:
        extra = 2 if self._event_idx() else 0  # used_event / avail_event
        parts = (
            ("desc", addr.desc, _DESC_SIZE * num, 16),
            ("avail", addr.avail, 4 + 2 * num + extra, 2),
            ("used", addr.used, 4 + 8 * num + extra, 4),
        )
        for name, start, length, align in parts:
            if start % align:
                raise _err(Reason.UNMAPPED, msg, f"{name} {start:#x} misaligned")
            try:
                with mem.uva(start, length):
                    pass
            except GuestMemoryError:
                raise _err(
                    Reason.UNMAPPED, msg, f"{name} {start:#x}+{length:#x} not mapped"
                ) from None

    def _sync(self, msg: Message, index: int) -> None:
        """Start or stop the device's view of a ring to match its state."""
        ring = self._rings[index]
        want = (
            ring.kick is not None
            and ring.enabled
            and self._mapping is not None
            and ring.num is not None
            and ring.addr is not None
        )
        if ring.queue is not None and not want:
            self._stop(index)
        elif ring.queue is None and want:
            assert self._mapping is not None and ring.num is not None
            assert ring.addr is not None and ring.kick is not None
            mem = self._mapping.mem
            self._check_layout(msg, mem, ring.num, ring.addr)
            try:
                queue = SplitQueue(
                    mem, ring.num, ring.addr.desc, ring.addr.avail, ring.addr.used,
                    event_idx=self._event_idx(),
                    indirect=bool(self.acked_features & NetF.RING_INDIRECT_DESC),
                    last_avail_idx=ring.base,
                )
            except (GuestMemoryError, VirtqueueError) as exc:
                raise _err(Reason.UNMAPPED, msg, str(exc)) from None
            ring.queue = queue
            self.hooks.queue_started(index, queue, ring.kick, ring.call)

    def _stop(self, index: int) -> None:
        ring = self._rings[index]
        if ring.queue is not None:
            ring.queue = None
            ring.base = self.hooks.queue_stopped(index) & 0xFFFF

    def _stop_all(self) -> list[int]:
        running = [i for i, r in enumerate(self._rings) if r.queue is not None]
        for i in running:
            self._stop(i)
        return running

    def _restart(self, msg: Message, indexes: list[int]) -> None:
        """Start rings again after a change; report the first that no longer fits."""
        first: VhostUserError | None = None
        for i in indexes:
            try:
                self._sync(msg, i)
            except VhostUserError as err:
                first = first or err
        if first is not None:
            raise first

    # --- handlers --------------------------------------------------------------------

    def _get_features(self, msg: Message, fds: list[int]) -> int:
        return self.offered_features

    def _set_features(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, int)
        extra = msg.payload & ~self.offered_features
        if extra:
            raise _err(Reason.BAD_FEATURES, msg, f"not offered: {extra:#x}")
        self._stop_all()  # event_idx/indirect may change under a running ring
        self.acked_features = msg.payload
        self.hooks.features_set(msg.payload)
        if not msg.payload & NetF.PROTOCOL_FEATURES:
            for ring in self._rings:
                ring.enabled = True
        # Every ring: the running ones restart, and any the implicit enable completes start.
        self._restart(msg, list(range(self.num_queues)))

    def _require_protocol(self, msg: Message) -> None:
        if not self.offered_features & NetF.PROTOCOL_FEATURES:
            raise _err(Reason.NOT_NEGOTIATED, msg, "PROTOCOL_FEATURES not offered")

    def _get_protocol_features(self, msg: Message, fds: list[int]) -> int:
        self._require_protocol(msg)
        return self.offered_protocol_features

    def _set_protocol_features(self, msg: Message, fds: list[int]) -> None:
        self._require_protocol(msg)
        assert isinstance(msg.payload, int)
        extra = msg.payload & ~self.offered_protocol_features
        if extra:
            raise _err(Reason.BAD_PROTOCOL_FEATURES, msg, f"not offered: {extra:#x}")
        self.protocol_features = msg.payload

    def _set_owner(self, msg: Message, fds: list[int]) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message, fds: list[int]) -> None:
        # Deprecated. The doc recommends ignoring it or disabling all rings, and warns that
        # discarding connection state on it leads to bugs: we disable the rings.
        for index, ring in enumerate(self._rings):
            ring.enabled = False
            self._sync(msg, index)

    def _reset_device(self, msg: Message, fds: list[int]) -> None:
        if not self.offered_protocol_features & ProtocolFeature.RESET_DEVICE:
            raise _err(Reason.NOT_NEGOTIATED, msg, "RESET_DEVICE not offered")
        self._reset()

    def _reset(self) -> None:
        self._stop_all()
        self.hooks.reset()
        for ring in self._rings:
            ring.close_fds()
        self._rings = [_Ring() for _ in range(self.num_queues)]
        self.acked_features = 0

    def _set_mem_table(self, msg: Message, fds: list[int]) -> None:
        table = msg.payload
        assert isinstance(table, MemTable) and len(fds) == len(table.regions)
        regions = table.regions
        for r in regions:
            if r.size == 0 or r.gpa + r.size > _U64_END or r.uva + r.size > _U64_END:
                raise _err(Reason.BAD_MEM_TABLE, msg, f"region {r}")
            if r.mmap_offset + r.size >= 1 << 63:
                raise _err(Reason.BAD_MEM_TABLE, msg, f"offset of region {r}")
        for key in ("gpa", "uva"):
            spans = sorted((getattr(r, key), getattr(r, key) + r.size) for r in regions)
            for (_, end), (start, _) in itertools.pairwise(spans):
                if start < end:
                    raise _err(Reason.BAD_MEM_TABLE, msg, f"overlapping {key} ranges")
        maps: list[mmap.mmap] = []
        built: list[Region] = []
        try:
            for r, fd in zip(regions, fds, strict=True):
                # Touching a MAP_SHARED page past the end of the file is SIGBUS.
                try:
                    file_size = os.fstat(fd).st_size
                except OSError as exc:
                    raise _err(Reason.BAD_MEM_TABLE, msg, f"fstat: {exc}") from None
                if r.mmap_offset + r.size > file_size:
                    raise _err(Reason.BAD_MEM_TABLE, msg, f"region past end of fd ({file_size})")
                start = r.mmap_offset - r.mmap_offset % _PAGE
                delta = r.mmap_offset - start
                try:
                    mm = mmap.mmap(
                        fd, delta + r.size, flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise _err(Reason.MMAP_FAILED, msg, str(exc)) from None
                maps.append(mm)
                with memoryview(mm) as whole:
                    built.append(Region(r.gpa, r.size, r.uva, whole[delta : delta + r.size]))
            try:
                mem = GuestMemory(built)
            except GuestMemoryError as exc:
                raise _err(Reason.BAD_MEM_TABLE, msg, str(exc)) from None
        except BaseException:
            for region in built:
                region.buf.release()
            _unmap(maps)
            raise
        # mmap keeps its own duplicate of each fd; ours are not needed any more.
        close_fds(fds)
        fds.clear()
        running = self._stop_all()
        old, self._mapping = self._mapping, _Mapping(maps, mem)
        try:
            self._restart(msg, running)
        finally:
            if old is not None:
                old.close()

    def _set_vring_num(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg, msg.payload.index)
        if ring.queue is not None:
            raise _err(Reason.RING_BUSY, msg, f"ring {msg.payload.index} running")
        num = msg.payload.num
        if not 1 <= num <= self.max_queue_size or num & (num - 1):
            raise _err(Reason.BAD_NUM, msg, f"size {num}")
        ring.num = num

    def _set_vring_base(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg, msg.payload.index)
        if ring.queue is not None:
            raise _err(Reason.RING_BUSY, msg, f"ring {msg.payload.index} running")
        if msg.payload.num > 0xFFFF:  # split rings: a 16-bit avail index
            raise _err(Reason.BAD_NUM, msg, f"base {msg.payload.num:#x}")
        ring.base = msg.payload.num

    def _set_vring_addr(self, msg: Message, fds: list[int]) -> None:
        addr = msg.payload
        assert isinstance(addr, VringAddr)
        ring = self._ring(msg, addr.index)
        if addr.flags:  # VHOST_VRING_F_LOG: dirty logging is never offered
            raise _err(Reason.BAD_PAYLOAD, msg, f"vring flags {addr.flags:#x}")
        if self._mapping is not None and ring.num is not None:
            self._check_layout(msg, self._mapping.mem, ring.num, addr)
        running = ring.queue is not None
        if running:
            self._stop(addr.index)
        ring.addr = addr
        self._sync(msg, addr.index)

    def _get_vring_base(self, msg: Message, fds: list[int]) -> VringState:
        assert isinstance(msg.payload, VringState)
        index = msg.payload.index
        ring = self._ring(msg, index)
        self._stop(index)
        # Stopped: QEMU sends fresh kick and call fds when it starts the ring again.
        ring.close_fds()
        return VringState(index, ring.base)

    def _set_vring_kick(self, msg: Message, fds: list[int]) -> None:
        vf = msg.payload
        assert isinstance(vf, VringFile)
        ring = self._ring(msg, vf.index)
        if vf.nofd:
            raise _err(Reason.NO_POLLING, msg, f"ring {vf.index}")
        self._stop(vf.index)
        if ring.kick is not None:
            close_fds([ring.kick])
        ring.kick = fds.pop()
        self._sync(msg, vf.index)

    def _set_vring_call(self, msg: Message, fds: list[int]) -> None:
        vf = msg.payload
        assert isinstance(vf, VringFile)
        ring = self._ring(msg, vf.index)
        new = None if vf.nofd else fds.pop()
        old, ring.call = ring.call, new
        if ring.queue is not None:
            self.hooks.queue_call_changed(vf.index, new)
            if new is not None:
                # QEMU starts a ring (SET_VRING_KICK) before it sends the call fd it listens
                # to, and discards what arrived on the earlier one. After a reconnect the ring
                # may already have used entries whose interrupt went there; with EVENT_IDX
                # the driver would then wait for it forever. A spurious interrupt is harmless
                # (libvhost-user signals here too).
                with contextlib.suppress(OSError):
                    os.eventfd_write(new, 1)
        if old is not None:
            close_fds([old])

    def _set_vring_err(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, VringFile)
        self._ring(msg, msg.payload.index)
        # We never signal ring errors; the fd is closed when handle() returns.

    def _get_queue_num(self, msg: Message, fds: list[int]) -> int:
        # vhost-user-net counts queue pairs here (QEMU compares it with queues=).
        return max(1, self.num_queues // 2)

    def _set_vring_enable(self, msg: Message, fds: list[int]) -> None:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg, msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise _err(Reason.BAD_NUM, msg, f"enable {msg.payload.num}")
        ring.enabled = bool(msg.payload.num)
        self._sync(msg, msg.payload.index)

    def _send_rarp(self, msg: Message, fds: list[int]) -> None:
        # Only sent after a migration, which this back-end never takes part in.
        return None
