"""The vionet worker process: enter the sandbox, then serve the parent and the device.

Everything this process will ever need is imported at the top, before the sandbox: afterwards
there is no filesystem (empty chroot) and no open() (seccomp), so a lazy import would fail.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import socket
import sys

import trio

from imsg.catalogue import VIONET_FROM_PARENT, MsgType
from imsg.channel import ImsgSocket, TrioImsgChannel
from imsg.codec import Imsg
from imsg.errors import ImsgError
from vionet.counters import Counters
from vionet.datapath import DEFAULT_POLL_US, MAX_POLL_US
from vionet.device import NetDevice
from vionet.dhcp import LocalLink
from vionet.probe import run_probes
from vionet.vhost_session import Session
from vionet.vhost_user import VhostUserError
from vmd_py import sandbox
from vmd_py.virtio_defs import NetF, tun_mask_for

log = logging.getLogger("vionet")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vionet")
    p.add_argument("--nic", required=True)
    p.add_argument("--imsg-fd", type=int, required=True)
    p.add_argument("--tap-fd", type=int, required=True)
    p.add_argument("--vhost-fd", type=int)
    p.add_argument("--features", type=lambda s: int(s, 0), required=True)
    p.add_argument("--mac", type=_mac)
    p.add_argument("--locked", action="store_true")
    p.add_argument("--poll-us", type=_poll_us, default=DEFAULT_POLL_US)
    p.add_argument("--local-guest", type=ipaddress.IPv4Address)
    p.add_argument("--local-host", type=ipaddress.IPv4Address)
    p.add_argument("--user", default="_vmd")
    p.add_argument("--empty-root", default="/var/lib/vmd-py/empty")
    p.add_argument("--no-sandbox", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.local_guest is None) != (args.local_host is None):
        p.error("--local-guest and --local-host go together")
    if (args.locked or args.local_guest is not None) and args.mac is None:
        p.error("--locked and a local interface need --mac")
    return args


def _mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(x) == 2 for x in parts):
        raise argparse.ArgumentTypeError(f"bad MAC {text!r}")
    try:
        return bytes.fromhex("".join(parts))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad MAC {text!r}") from None


def _poll_us(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad poll window {text!r}") from None
    if not 0 <= value <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"poll window {value} us out of 0..{MAX_POLL_US}")
    return value


def local_link(args: argparse.Namespace) -> LocalLink | None:
    if args.local_guest is None:
        return None
    return LocalLink(guest=args.local_guest, host=args.local_host)


class Worker:
    """State shared by the parent channel and the device."""

    def __init__(self, args: argparse.Namespace, chan: TrioImsgChannel) -> None:
        self.args = args
        self.chan = chan
        self.offered: int = args.features
        self.acked = 0
        # The mask the parent confirmed. Until it does, the tap is treated as offload-free.
        self.tap_offload = 0
        self.paused = False
        self.counters = Counters()
        self.device: NetDevice | None = None
        self._nursery: trio.Nursery | None = None

    def request_offload(self, acked: int) -> None:
        """Called by the device after SET_FEATURES (and with 0 when it stops): ask the parent
        for the matching tap mask. Until it answers, the tap counts as offload-free."""
        self.acked = acked
        self.tap_offload = 0
        mask = tun_mask_for(acked)
        assert self._nursery is not None
        self._nursery.start_soon(
            self.chan.send, Imsg(MsgType.TUNSCAP, {"mask": mask, "features": acked})
        )

    def ring_error(self, why: str) -> None:
        """From a packet thread: the ring is broken; the device needs a reset (counted)."""
        self.counters.inc("device_needs_reset")
        log.error("%s: device needs reset: %s", self.args.nic, why)

    async def serve_vhost(self, listener: socket.socket) -> None:
        """Accept QEMU's vhost-user connection; after a hang-up, accept the next one (QEMU
        reconnects after a restart of either side)."""
        listener.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            self.counters.inc("vhost_connections")
            device = NetDevice(self.args.tap_fd, self.counters, self.request_offload,
                               self.ring_error, mac=self.args.mac, locked=self.args.locked,
                               local=local_link(self.args), poll_us=self.args.poll_us)
            device.set_paused(self.paused)
            self.device = device
            session = Session(device, offered_features=self.offered | NetF.PROTOCOL_FEATURES)
            try:
                while True:
                    try:
                        await session.serve(conn)
                        break  # peer hung up
                    except VhostUserError as exc:
                        self.counters.inc(f"vhost_refused_{exc.reason.value}")
                        log.warning("%s: vhost-user refused: %s", self.args.nic, exc)
                        if exc.fatal:
                            break
            finally:
                session.close()
                device.close()
                conn.close()
                self.device = None

    async def serve_parent(self) -> None:
        while True:
            try:
                msg = await self.chan.receive()
            except ImsgError as exc:
                self.counters.inc(f"imsg_refused_{exc.kind.value}")
                await self.chan.send_error(exc.kind.value, str(exc))
                continue
            except EOFError:
                log.info("%s: parent closed the channel", self.args.nic)
                return
            await self._dispatch(msg)

    async def _dispatch(self, msg: Imsg) -> None:
        if msg.type is MsgType.STATS_REQUEST:
            await self.chan.send(Imsg(MsgType.STATS, self.stats()))
        elif msg.type is MsgType.PROBE_SANDBOX:
            results = run_probes(self.args.tap_fd, self.args.imsg_fd)
            await self.chan.send(Imsg(MsgType.PROBE_RESULT, {"results": results}))
        elif msg.type in (MsgType.PAUSE, MsgType.RESUME):
            self.paused = msg.type is MsgType.PAUSE
            if self.device is not None:
                self.device.set_paused(self.paused)
            await self.chan.send(Imsg(MsgType.OK, {}))
        elif msg.type is MsgType.TUNSCAP_RESULT:
            self.tap_offload = msg.payload["mask"]
        elif msg.type is MsgType.ERROR:
            self.counters.inc(f"parent_error_{msg.payload['code']}")
            log.warning("%s: parent refused: %s", self.args.nic, msg.payload["detail"])

    def stats(self) -> dict[str, object]:
        return {
            "features_offered": self.offered,
            "features_acked": self.acked,
            "tap_offload": self.tap_offload,
            "paused": self.paused,
            "counters": self.counters.snapshot(),
        }

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.args.vhost_fd is not None:
                nursery.start_soon(self.serve_vhost, socket.socket(fileno=self.args.vhost_fd))
            await self.serve_parent()
            nursery.cancel_scope.cancel()


async def _amain(args: argparse.Namespace, sock: socket.socket) -> None:
    if not args.no_sandbox:
        # After trio made its epoll fd and wakeup socketpair; before reading any message.
        sandbox.lock_down()
    chan = TrioImsgChannel(ImsgSocket(sock, VIONET_FROM_PARENT), role="vionet")
    # Everything made so far (modules, trio's machinery) lives as long as the process: out of
    # the cyclic GC's sight, a full collection no longer walks it, so it cannot stall the
    # packet thread for milliseconds (long enough for a TCP tail-loss probe).
    gc.collect()
    gc.freeze()
    await chan.hello()
    await Worker(args, chan).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"vionet[{os.getpid()}] %(levelname)s %(message)s",
    )
    sock = socket.socket(fileno=args.imsg_fd)
    if not args.no_sandbox:
        sandbox.drop_privileges(user=args.user, empty_root=args.empty_root)
    trio.run(_amain, args, sock)
    return 0
