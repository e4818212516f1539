"""A fake QEMU: the vhost-user front-end side, for driving a back-end in tests.

Guest RAM is a memfd the test can read and write through ``ram``; guest-physical
address ``gpa`` lives at front-end virtual address ``uva_base + gpa``. Kick and call are
eventfds the front-end keeps (its copies) and passes to the back-end. Every request
with a reply blocks until it arrives, so run the back-end on another thread or task; the
others return once sent (unless REPLY_ACK is in use): call :meth:`FakeFrontend.sync`
before looking at the back-end's state. :meth:`start` and :meth:`stop` end in sync.
"""

from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from vionet.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    VERSION,
    Frame,
    MemRegion,
    MemTable,
    Payload,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
    encode,
    recv_frame,
    send_message,
    unpack_u64,
)

UVA_BASE = 0x7F00_0000_0000
DEFAULT_RAM = 4 << 20


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of one split ring."""

    desc: int
    avail: int
    used: int
    num: int


class FrontendError(Exception):
    """The back-end answered something a front-end would not accept."""


class FakeFrontend:
    def __init__(
        self,
        sock: socket.socket,
        *,
        ram_size: int = DEFAULT_RAM,
        uva_base: int = UVA_BASE,
        reply_ack: bool = False,
    ) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.ram_size = ram_size
        self.uva_base = uva_base
        self.reply_ack = reply_ack  # set NEED_REPLY on requests without a reply body
        self.memfd = os.memfd_create("vhost-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, ram_size)
        self.ram = mmap.mmap(self.memfd, ram_size, flags=mmap.MAP_SHARED)
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.rings: dict[int, RingLayout] = {}

    # --- addresses -------------------------------------------------------------------

    def uva(self, gpa: int) -> int:
        return self.uva_base + gpa

    def ring_layout(self, index: int, num: int) -> RingLayout:
        """A ring placed in its own 256 KiB slot at the top of RAM."""
        slot = self.ram_size - (index + 1) * 0x40000
        desc = slot
        avail = desc + 16 * num
        used = (avail + 6 + 2 * num + 3) & ~3
        if used + 6 + 8 * num > slot + 0x40000:
            raise ValueError(f"ring of {num} does not fit its slot")
        return RingLayout(desc, avail, used, num)

    # --- wire ------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: Payload = None,
        fds: Sequence[int] = (),
        *,
        flags: int = VERSION,
    ) -> None:
        send_message(self.sock, encode(request, payload, flags=flags), fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_message(self.sock, data, fds)

    def recv_reply(self, request: int) -> bytes:
        frame: Frame = recv_frame(self.sock)
        if frame.fds:
            for fd in frame.fds:
                os.close(fd)
            raise FrontendError("reply carried fds")
        if frame.header.request != request or not frame.header.flags & FLAG_REPLY:
            raise FrontendError(f"unexpected reply {frame.header}")
        return frame.payload

    def call_(self, request: Request, payload: Payload = None, fds: Sequence[int] = ()) -> None:
        """A request without a reply body; waits for the ack when REPLY_ACK is in use."""
        flags = VERSION | (FLAG_NEED_REPLY if self.reply_ack else 0)
        self.send(request, payload, fds, flags=flags)
        if self.reply_ack:
            status = unpack_u64(self.recv_reply(request))
            if status:
                raise FrontendError(f"{request.name} failed: {status}")

    def query_u64(self, request: Request) -> int:
        self.send(request)
        return unpack_u64(self.recv_reply(request))

    # --- requests --------------------------------------------------------------------

    def sync(self) -> int:
        """A round trip (GET_FEATURES): everything sent before has been handled."""
        return self.get_features()

    def get_features(self) -> int:
        return self.query_u64(Request.GET_FEATURES)

    def get_protocol_features(self) -> int:
        return self.query_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, value: int) -> None:
        self.call_(Request.SET_PROTOCOL_FEATURES, value)

    def set_owner(self) -> None:
        self.call_(Request.SET_OWNER)

    def set_features(self, value: int) -> None:
        self.call_(Request.SET_FEATURES, value)

    def set_mem_table(self) -> None:
        table = MemTable((MemRegion(0, self.ram_size, self.uva(0), 0),))
        self.call_(Request.SET_MEM_TABLE, table, [self.memfd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call_(Request.SET_VRING_ENABLE, VringState(index, int(enable)))

    def set_vring_call(self, index: int) -> int:
        """Send a fresh call eventfd; returns the front-end's copy."""
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.call_(Request.SET_VRING_CALL, VringFile(index, False), [fd])
        except BaseException:
            os.close(fd)
            raise
        old = self.call.pop(index, None)
        if old is not None:
            os.close(old)
        self.call[index] = fd
        return fd

    def set_vring_err(self, index: int) -> None:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self.call_(Request.SET_VRING_ERR, VringFile(index, False), [fd])
        finally:
            os.close(fd)

    def set_vring_kick(self, index: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.call_(Request.SET_VRING_KICK, VringFile(index, False), [fd])
        except BaseException:
            os.close(fd)
            raise
        old = self.kick.pop(index, None)
        if old is not None:
            os.close(old)
        self.kick[index] = fd
        return fd

    def setup_queue(self, index: int, num: int, base: int = 0) -> RingLayout:
        """QEMU's vhost_virtqueue_start: NUM, BASE, ADDR, KICK, CALL."""
        ring = self.ring_layout(index, num)
        self.call_(Request.SET_VRING_NUM, VringState(index, num))
        self.call_(Request.SET_VRING_BASE, VringState(index, base))
        addr = VringAddr(
            index, 0, self.uva(ring.desc), self.uva(ring.used), self.uva(ring.avail), 0
        )
        self.call_(Request.SET_VRING_ADDR, addr)
        self.set_vring_kick(index)
        self.set_vring_call(index)
        self.rings[index] = ring
        return ring

    def get_vring_base(self, index: int) -> int:
        self.send(Request.GET_VRING_BASE, VringState(index, 0))
        state = VringState.unpack(self.recv_reply(Request.GET_VRING_BASE))
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE answered for ring {state.index}")
        return state.num

    def kick_queue(self, index: int) -> None:
        os.eventfd_write(self.kick[index], 1)

    def start(
        self,
        acked_features: int,
        *,
        num_queues: int = 2,
        queue_size: int = 256,
        protocol_features: int | None = None,
        bases: Sequence[int] = (),
    ) -> dict[str, int]:
        """QEMU's order from connect to running rings; returns what the back-end offered.

        ``protocol_features`` defaults to everything the back-end offers; ``bases`` are the
        rings' SET_VRING_BASE values (default 0).
        """
        want_ack, self.reply_ack = self.reply_ack, False
        offered = self.get_features()
        offered_protocol = self.get_protocol_features()
        proto = offered_protocol if protocol_features is None else protocol_features
        self.set_protocol_features(proto)
        self.reply_ack = want_ack and bool(proto & ProtocolFeature.REPLY_ACK)
        self.set_owner()
        self.get_features()
        for index in range(num_queues):
            self.set_vring_call(index)
            self.set_vring_err(index)
        for index in range(num_queues):
            self.set_vring_enable(index, True)
        self.set_features(acked_features)
        self.set_mem_table()
        for index in range(num_queues):
            self.setup_queue(index, queue_size, bases[index] if index < len(bases) else 0)
        for index in range(num_queues):
            self.set_vring_enable(index, True)
        self.sync()
        return {"features": offered, "protocol_features": offered_protocol}

    def stop(self, num_queues: int = 2) -> list[int]:
        """The guest stopping the device: disable, then GET_VRING_BASE per ring."""
        for index in range(num_queues):
            self.set_vring_enable(index, False)
        return [self.get_vring_base(index) for index in range(num_queues)]

    def close(self) -> None:
        for fd in [*self.kick.values(), *self.call.values()]:
            os.close(fd)
        self.kick.clear()
        self.call.clear()
        self.ram.close()
        os.close(self.memfd)
        self.sock.close()
