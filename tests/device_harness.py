"""A rig for device-level tests: the real vhost-user Session, NetDevice and packet loops.

The test plays QEMU (FakeFrontend over a socketpair, served by ``Session.serve`` under trio on
a thread) and the guest driver (a FakeDriver per queue, writing the rings inside the
front-end's RAM at the layout the front-end told the back-end). The tap is either a real one
or a :class:`FakeTap`: a SOCK_SEQPACKET socketpair carrying one datagram per frame, each the
12-byte vnet header then the Ethernet frame, as a tap with IFF_VNET_HDR does.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import dpkt
import trio

from parent.broker import offered_features
from tests.vhost_frontend import FakeFrontend
from tests.virtio_harness import FakeDriver, Used
from vionet import csum
from vionet.counters import Counters
from vionet.device import RX_QUEUE, TX_QUEUE, NetDevice
from vionet.dhcp import LocalLink
from vionet.guestmem import GuestMemory, Region
from vionet.vhost_session import Session
from vionet.vhost_user import VhostUserError
from vionet.vnethdr import VnetHdr
from vmd_py.virtio_defs import VNET_HDR_LEN, NetF

# What the parent offers with offload "tso" (it never offers indirect descriptors or EVENT_IDX).
OFFERED = offered_features("all") | int(NetF.PROTOCOL_FEATURES)
BASE_ACKED = int(NetF.VERSION_1 | NetF.PROTOCOL_FEATURES)
RAM_SIZE = 8 << 20
MB = 1 << 20
# Data areas of the two drivers; the front-end puts the rings in the top 512 KiB.
RX_DATA = (0, 3 * MB)
TX_DATA = (3 * MB, 7 * MB)
SOCKBUF = 32 * MB
PLAIN_HDR = VnetHdr()
SO_SNDBUFFORCE = 32  # asm-generic/socket.h (root only: ignores wmem_max)
SO_RCVBUFFORCE = 33

MAC_GUEST = b"\x52\x54\x00\x12\x34\x56"
MAC_HOST = b"\x02\x00\x00\x00\x00\x01"
IP_GUEST = b"\x0a\x09\x00\x02"
IP_HOST = b"\x0a\x09\x00\x01"


# --- frames ---------------------------------------------------------------------------------


def ip_frame(
    proto: str,
    payload: bytes,
    *,
    src_mac: bytes = MAC_GUEST,
    dst_mac: bytes = MAC_HOST,
    src_ip: bytes = IP_GUEST,
    dst_ip: bytes = IP_HOST,
    dport: int = 9999,
) -> bytes:
    """An Ethernet/IPv4 TCP or UDP frame with correct checksums (dpkt computes them)."""
    l4: dpkt.Packet
    if proto == "tcp":
        l4 = dpkt.tcp.TCP(sport=40000, dport=dport, seq=1, flags=dpkt.tcp.TH_ACK, data=payload)
        num = dpkt.ip.IP_PROTO_TCP
    else:
        l4 = dpkt.udp.UDP(sport=40000, dport=dport, data=payload)
        l4.ulen = 8 + len(payload)
        num = dpkt.ip.IP_PROTO_UDP
    ip = dpkt.ip.IP(src=src_ip, dst=dst_ip, p=num, ttl=64, data=l4)
    ip.len = 20 + len(bytes(l4))
    return bytes(dpkt.ethernet.Ethernet(src=src_mac, dst=dst_mac, type=0x0800, data=ip))


def partial(frame: bytes) -> tuple[bytes, VnetHdr]:
    """The frame as a NEEDS_CSUM sender hands it over, and its header."""
    buf = bytearray(frame)
    loc = csum.make_partial(buf)
    assert loc is not None
    return bytes(buf), VnetHdr(flags=1, csum_start=loc[0], csum_offset=loc[1])


def raw_frame(length: int, seq: int = 0, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame of ``length`` bytes (local experimental ethertype) tagged ``seq``."""
    head = MAC_HOST + MAC_GUEST + struct.pack("!HI", ethertype, seq)
    body = bytes((seq + k) & 0xFF for k in range(max(length - len(head), 0)))
    return (head + body)[:length]


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


# --- the tap ---------------------------------------------------------------------------------


class FakeTap:
    """The device gets ``device_fd`` (non-blocking, like the real tap's fd); the test uses
    the other end as the host side."""

    def __init__(self) -> None:
        self.dev, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.dev, self.host):
            # A real tap's write never blocks; do not let a full socket buffer fake EAGAIN.
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKBUF)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKBUF)
        self.dev.setblocking(False)
        self.device_fd = self.dev.fileno()

    def inject(self, frame: bytes, hdr: VnetHdr | bytes = PLAIN_HDR) -> None:
        """A frame the tap hands the device (host -> guest)."""
        raw = hdr.pack() if isinstance(hdr, VnetHdr) else hdr
        self.host.send(raw + frame)

    def read(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """The next (header, frame) the device wrote to the tap."""
        ready, _, _ = select.select([self.host], [], [], timeout)
        if not ready:
            raise TimeoutError("nothing came out of the tap")
        data = self.host.recv(1 << 17)
        return data[:VNET_HDR_LEN], data[VNET_HDR_LEN:]

    def read_ready(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        while True:
            try:
                data = self.host.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.append((data[:VNET_HDR_LEN], data[VNET_HDR_LEN:]))

    def idle(self, wait: float = 0.1) -> bool:
        """True if nothing comes out of the tap within ``wait`` seconds."""
        ready, _, _ = select.select([self.host], [], [], wait)
        return not ready

    def close(self) -> None:
        self.dev.close()
        self.host.close()


# --- the rig ---------------------------------------------------------------------------------


@dataclass
class RxFrame:
    hdr: VnetHdr
    frame: bytes
    used: list[Used]


@dataclass
class Rig:
    fe: FakeFrontend
    session: Session
    device: NetDevice
    counters: Counters
    mem: GuestMemory
    acked: int
    queue_size: int
    drivers: dict[int, FakeDriver] = field(default_factory=dict)
    offloads: list[int] = field(default_factory=list)
    ring_errors: list[str] = field(default_factory=list)
    backend_errors: list[BaseException] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=lambda: {RX_QUEUE: 0, TX_QUEUE: 0})
    _pending_used: dict[int, list[Used]] = field(
        default_factory=lambda: {RX_QUEUE: [], TX_QUEUE: []}
    )

    @property
    def rx(self) -> FakeDriver:
        return self.drivers[RX_QUEUE]

    @property
    def tx(self) -> FakeDriver:
        return self.drivers[TX_QUEUE]

    def new_drivers(self, bases: Sequence[int] = (0, 0)) -> None:
        """Lay out both rings afresh (zeroed, indexes at ``bases``) where the front-end says."""
        for index, (lo, hi) in ((RX_QUEUE, RX_DATA), (TX_QUEUE, TX_DATA)):
            layout = self.fe.ring_layout(index, self.queue_size)
            self.drivers[index] = FakeDriver(
                self.mem, self.queue_size, base_gpa=layout.desc, used_gpa=layout.used,
                data_gpa=lo, data_end=hi, start_idx=bases[index],
            )
            assert self.drivers[index].avail_gpa == layout.avail

    def kick(self, index: int) -> None:
        self.fe.kick_queue(index)

    # -- guest TX --------------------------------------------------------------------------

    def post_tx(
        self,
        frame: bytes,
        hdr: VnetHdr | bytes = PLAIN_HDR,
        *,
        cuts: Sequence[int] = (),
        indirect: bool = False,
        expose: bool = True,
    ) -> int:
        """Post header + frame as one readable chain, split at ``cuts`` (offsets into the
        12-byte header + frame); returns the head."""
        raw = hdr.pack() if isinstance(hdr, VnetHdr) else hdr
        return self.tx.add(split_at(raw + frame, cuts), indirect=indirect, expose=expose)

    # -- guest RX --------------------------------------------------------------------------

    def post_rx(self, n: int, size: int = 1536, *, expose: bool = True) -> list[int]:
        heads = [self.rx.add(writable=[size], expose=False) for _ in range(n)]
        if expose:
            self.rx.expose()
        return heads

    # -- completions -----------------------------------------------------------------------

    def wait_used(self, index: int, n: int, timeout: float = 5.0) -> list[Used]:
        """``n`` used elements of queue ``index`` (checked like Linux: every id a head that
        was posted and is outstanding), waiting on the call eventfd."""
        got = self._pending_used[index]
        deadline = time.monotonic() + timeout
        call = self.fe.call[index]
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([call], [], [], left)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)
                    self.calls[index] += 1
            got.extend(self.drivers[index].get_used())
        if len(got) < n:
            got.extend(self.drivers[index].get_used())
        if len(got) < n:
            raise TimeoutError(f"queue {index}: {len(got)} of {n} used elements")
        out, self._pending_used[index] = got[:n], got[n:]
        return out

    def recv_rx(self, count: int, timeout: float = 5.0) -> list[RxFrame]:
        """``count`` frames from the RX ring, reassembling MRG_RXBUF buffers."""
        mrg = bool(self.acked & NetF.MRG_RXBUF)
        frames = []
        for _ in range(count):
            first = self.wait_used(RX_QUEUE, 1, timeout)[0]
            assert first.length >= VNET_HDR_LEN, first
            hdr = VnetHdr.unpack(first.written[:VNET_HDR_LEN])
            used = [first]
            if mrg:
                assert hdr.num_buffers >= 1, hdr
                used += self.wait_used(RX_QUEUE, hdr.num_buffers - 1, timeout)
            data = b"".join(u.written for u in used)
            frames.append(RxFrame(hdr, data[VNET_HDR_LEN:], used))
        return frames

    def rx_idle(self, wait: float = 0.1) -> bool:
        """True if no RX buffer is completed within ``wait`` seconds."""
        time.sleep(wait)
        return not self._pending_used[RX_QUEUE] and self.rx.used_idx() == self.rx.last_used

    # -- life cycle ------------------------------------------------------------------------

    def threads_alive(self) -> bool:
        loops = self.device.loops
        return set(loops) == {RX_QUEUE, TX_QUEUE} and all(
            not loop.dead and loop.engine.thread is not None and loop.engine.thread.is_alive()
            for loop in loops.values()
        )

    def stop(self) -> list[int]:
        """QEMU's vhost_dev_stop: disable both rings, GET_VRING_BASE each."""
        return self.fe.stop()

    def resume(self, bases: Sequence[int]) -> None:
        """QEMU's vhost_dev_start after a stop: features, memory table, rings, enable."""
        self.fe.set_features(self.acked)
        self.fe.set_mem_table()
        for index in (RX_QUEUE, TX_QUEUE):
            self.fe.setup_queue(index, self.queue_size, bases[index])
        for index in (RX_QUEUE, TX_QUEUE):
            self.fe.set_vring_enable(index, True)
        self.fe.sync()


@contextlib.contextmanager
def running_device(
    tap_fd: int,
    acked: int,
    *,
    offered: int = OFFERED,
    queue_size: int = 256,
    bases: Sequence[int] = (0, 0),
    mac: bytes | None = None,
    locked: bool = False,
    local: LocalLink | None = None,
) -> Iterator[Rig]:
    """A NetDevice on ``tap_fd`` behind a vhost-user Session, started with ``acked``;
    ``mac``/``locked``/``local`` are the NIC's rules (locked lladdr, local interface)."""
    counters = Counters()
    offloads: list[int] = []
    ring_errors: list[str] = []
    device = NetDevice(tap_fd, counters, offloads.append, ring_errors.append, mac=mac,
                       locked=locked, local=local)
    session = Session(device, offered_features=offered)
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe = FakeFrontend(front, ram_size=RAM_SIZE)
    mem = GuestMemory([Region(0, RAM_SIZE, fe.uva_base, memoryview(fe.ram))])
    rig = Rig(fe, session, device, counters, mem, acked, queue_size, offloads=offloads,
              ring_errors=ring_errors)

    def serve() -> None:
        try:
            trio.run(session.serve, back)
        except (VhostUserError, OSError) as exc:
            rig.backend_errors.append(exc)
            session.close()
        finally:
            back.close()

    thread = threading.Thread(target=serve, name="vhost-backend", daemon=True)
    thread.start()
    try:
        rig.new_drivers(bases)
        fe.start(acked, queue_size=queue_size, bases=bases)
        assert rig.threads_alive()
        yield rig
    finally:
        with contextlib.suppress(OSError):
            front.shutdown(socket.SHUT_RDWR)
        thread.join(10)
        assert not thread.is_alive(), "back-end did not stop on hang-up"
        assert not device.loops, "packet loops left running"
        rig.drivers.clear()
        rig._pending_used.clear()
        mem.close()
        gc.collect()
        fe.close()
