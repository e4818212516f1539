"""The privileged parent's NIC supervision: taps, bridges, vionet workers and their imsgs.

Every message from a worker is hostile input. The parent answers refused messages with an ERROR,
counts them, closes any fds they carried, and keeps serving; a worker that exits or breaks its
channel gets its tap's offloads reset to 0 and is started again (with backoff), so a restarted
worker always begins from the state the guest has not yet negotiated.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field

import trio

from imsg.catalogue import PARENT_FROM_VIONET, MsgType
from imsg.channel import ImsgSocket, TrioImsgChannel
from imsg.codec import Imsg
from imsg.errors import ImsgError
from parent import bridge
from parent.broker import NicPolicy, TunscapRefused, allowed_mask, decide, offered_features
from parent.local import LocalAddrs, assign_host_address
from parent.placement import pin_process
from parent.spawn import EMPTY_ROOT, SANDBOX_USER, WorkerArgs, spawn_vionet
from parent.tap import Tap

log = logging.getLogger("vmd.parent")

HELLO_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass
class NicSpec:
    name: str
    tap: str
    switch: str | None = None
    offload: str = "all"
    mac: str | None = None
    locked: bool = False
    vhost_path: str | None = None  # where QEMU will connect (the parent listens, vionet accepts)
    local: LocalAddrs | None = None  # local interface: the /31 (host side goes on the tap)
    cpus: frozenset[int] | None = None  # where the worker may run (parent/placement.py)
    poll_us: int | None = None  # the busy-poll window (vm.conf "poll"); None: the default


@dataclass
class Nic:
    spec: NicSpec
    tap: Tap
    policy: NicPolicy
    vhost_sock: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    chan: TrioImsgChannel | None = None
    acked: int = 0
    restarts: int = 0
    stopping: bool = False
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    waiters: collections.deque[tuple[MsgType, trio.MemorySendChannel[Imsg]]] = field(
        default_factory=collections.deque
    )
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    supervised: trio.Event | None = None  # set when the supervisor task has finished

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None


class Parent:
    """Owns taps and workers. Run :meth:`run` in a nursery; add NICs with :meth:`add_nic`."""

    def __init__(self, *, user: str = SANDBOX_USER, empty_root: str = EMPTY_ROOT) -> None:
        self.user = user
        self.empty_root = empty_root
        self.nics: dict[str, Nic] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    for name in list(self.nics):
                        await self.remove_nic(name)

    # --- NICs -----------------------------------------------------------------------------

    def open_nic(self, spec: NicSpec) -> Nic:
        """Privileged set-up only (tap, bridge, vhost socket); no worker yet."""
        if spec.name in self.nics:
            raise ValueError(f"NIC {spec.name} exists")
        tap = Tap.open(spec.tap)
        try:
            if spec.switch:
                bridge.ensure_bridge(spec.switch)
                bridge.attach(tap.name, spec.switch)
            else:
                bridge.set_up(tap.name)
            if spec.local is not None:
                assign_host_address(tap.name, spec.local)
            vhost_sock = _listen_unix(spec.vhost_path) if spec.vhost_path else None
        except BaseException:
            tap.close()
            raise
        policy = NicPolicy(offered_features(spec.offload), allowed_mask(spec.offload))
        nic = Nic(spec, tap, policy, vhost_sock)
        self.nics[spec.name] = nic
        return nic

    async def add_nic(self, spec: NicSpec, *, spawn: bool = True) -> Nic:
        """Open the NIC and (by default) start its supervised worker; waits for its HELLO."""
        nic = self.open_nic(spec)
        if spawn:
            assert self._nursery is not None, "Parent.run is not running"
            nic.supervised = trio.Event()
            self._nursery.start_soon(self._supervise, nic)
            with trio.fail_after(HELLO_TIMEOUT):
                await nic.ready.wait()
        return nic

    async def remove_nic(self, name: str) -> None:
        nic = self.nics.pop(name, None)
        if nic is None:
            return
        nic.stopping = True
        await self._stop_worker(nic)
        if nic.supervised is not None:
            await nic.supervised.wait()
        if nic.vhost_sock is not None:
            nic.vhost_sock.close()
            if nic.spec.vhost_path:
                _unlink_quiet(nic.spec.vhost_path)
        nic.tap.close()

    async def _stop_worker(self, nic: Nic) -> None:
        proc = nic.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(3):
            await wait_process(proc)
        if proc.returncode is None:
            proc.kill()
            await wait_process(proc)

    async def _supervise(self, nic: Nic) -> None:
        try:
            await self._supervise_loop(nic)
        finally:
            if nic.supervised is not None:
                nic.supervised.set()

    async def _supervise_loop(self, nic: Nic) -> None:
        recent: list[float] = []
        while not nic.stopping:
            self._reset_offload(nic)
            proc, sock = spawn_vionet(
                WorkerArgs(
                    nic.spec.name, nic.policy.offered, nic.spec.mac, nic.spec.locked,
                    self.user, self.empty_root,
                    local_guest=str(nic.spec.local.guest) if nic.spec.local else None,
                    local_host=str(nic.spec.local.host) if nic.spec.local else None,
                    poll_us=nic.spec.poll_us,
                ),
                nic.tap.fd,
                nic.vhost_sock.fileno() if nic.vhost_sock else None,
            )
            nic.proc = proc
            nic.exited = trio.Event()
            log.info("%s: vionet worker pid %d", nic.spec.name, proc.pid)
            if nic.spec.cpus:
                # Still one thread (Popen returns after its exec): the engine thread it
                # starts later inherits the mask.
                pin_process(proc.pid, nic.spec.cpus)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve_then_cancel, nic, sock, nursery.cancel_scope)
                    if proc.stderr is not None:
                        nursery.start_soon(
                            relay_log, f"vionet.{nic.spec.name}", proc.stderr.fileno()
                        )
                    await wait_process(proc)
                    nic.exited.set()
                    nursery.cancel_scope.cancel()
            finally:
                sock.close()
                if proc.stderr is not None:
                    proc.stderr.close()
                nic.chan = None
            self._reset_offload(nic)
            if nic.stopping:
                break
            nic.restarts += 1
            self.counters["worker_exits"] += 1
            log.warning("%s: vionet exited with %s; restarting", nic.spec.name, proc.returncode)
            now = trio.current_time()
            recent = [t for t in recent if now - t < 30] + [now]
            await trio.sleep(RESTART_BACKOFF[min(len(recent), len(RESTART_BACKOFF)) - 1])

    async def _serve_then_cancel(
        self, nic: Nic, sock: socket.socket, scope: trio.CancelScope
    ) -> None:
        try:
            await self.serve_worker(nic, sock)
        finally:
            # A broken channel means a broken worker: stop it so the supervisor restarts it.
            if nic.proc is not None and nic.proc.returncode is None and not nic.stopping:
                nic.proc.kill()

    def _reset_offload(self, nic: Nic) -> None:
        nic.acked = 0
        if nic.tap.fd < 0:
            return
        try:
            nic.tap.set_offload(0)
        except OSError as exc:  # the tap is ours; failing here is a host problem, not the guest's
            log.error("%s: resetting offloads failed: %s", nic.spec.name, exc)

    # --- the worker's imsg channel ----------------------------------------------------------

    async def serve_worker(self, nic: Nic, sock: socket.socket) -> None:
        """Serve one worker channel until it closes. Public so tests can attach a fake worker."""
        chan = TrioImsgChannel(ImsgSocket(sock, PARENT_FROM_VIONET), role="parent")
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                await chan.hello()
        except (ImsgError, EOFError, OSError, trio.TooSlowError) as exc:
            self._count(nic, "hello_failed")
            log.error("%s: worker handshake failed: %s", nic.spec.name, exc)
            chan.close()
            return
        nic.chan = chan
        nic.ready.set()
        try:
            while True:
                try:
                    msg = await chan.receive()
                except ImsgError as exc:
                    self._count(nic, f"refused_{exc.kind.value}")
                    log.warning("%s: refused message from worker: %s", nic.spec.name, exc)
                    await chan.send_error(exc.kind.value, str(exc))
                    continue
                await self._dispatch(nic, chan, msg)
        except (EOFError, OSError) as exc:
            log.info("%s: worker channel closed: %s", nic.spec.name, exc)
        finally:
            nic.chan = None
            chan.close()
            for _, waiter in nic.waiters:
                waiter.close()
            nic.waiters.clear()

    def _count(self, nic: Nic, what: str) -> None:
        nic.counters[what] += 1
        self.counters[what] += 1

    async def _dispatch(self, nic: Nic, chan: TrioImsgChannel, msg: Imsg) -> None:
        if msg.type is MsgType.TUNSCAP:
            await self._tunscap(nic, chan, msg)
            return
        # Everything else a worker may send answers a request of ours.
        request_type = MsgType(msg.payload["request"]) if msg.type is MsgType.ERROR and \
            msg.payload["request"] in MsgType._value2member_map_ else None
        for i, (expected, waiter) in enumerate(nic.waiters):
            if expected is msg.type or (request_type is not None and expected is
                                        _result_of(request_type)):
                del nic.waiters[i]
                waiter.send_nowait(msg)
                waiter.close()
                return
        self._count(nic, "unsolicited")
        log.warning("%s: unsolicited %s from worker", nic.spec.name, msg.type.name)

    async def _tunscap(self, nic: Nic, chan: TrioImsgChannel, msg: Imsg) -> None:
        mask, features = msg.payload["mask"], msg.payload["features"]
        try:
            applied = decide(mask, features, nic.policy)
        except TunscapRefused as exc:
            self._count(nic, f"tunscap_refused_{exc.reason}")
            log.warning("%s: TUNSCAP refused: %s", nic.spec.name, exc)
            await chan.send_error(exc.reason, exc.detail, int(MsgType.TUNSCAP))
            return
        try:
            nic.tap.set_offload(applied)
        except OSError as exc:
            self._count(nic, "tunscap_ioctl_failed")
            await chan.send_error("ioctl_failed", str(exc), int(MsgType.TUNSCAP))
            return
        nic.acked = features
        self._count(nic, "tunscap_applied")
        log.info("%s: tap %s offloads %#x", nic.spec.name, nic.tap.name, applied)
        await chan.send(Imsg(MsgType.TUNSCAP_RESULT, {"mask": applied}))

    async def request(self, name: str, msg: Imsg, timeout: float = REQUEST_TIMEOUT) -> Imsg:
        """Send a request to a NIC's worker and wait for its result (or ERROR)."""
        nic = self.nics[name]
        if nic.chan is None:
            raise RuntimeError(f"{name}: no worker")
        expected = _result_of(msg.type)
        send, recv = trio.open_memory_channel[Imsg](1)
        nic.waiters.append((expected, send))
        await nic.chan.send(msg)
        with trio.fail_after(timeout):
            try:
                return await recv.receive()
            except trio.EndOfChannel:
                raise RuntimeError(f"{name}: worker went away") from None


def _result_of(request: MsgType) -> MsgType:
    from imsg.catalogue import result_type_for

    result = result_type_for(request)
    if result is None:
        raise ValueError(f"{request.name} is not a request")
    return result


async def wait_process(proc: subprocess.Popen[bytes]) -> None:
    """Wait for exit without blocking trio or racing other waiters (pidfd readiness)."""
    if proc.returncode is not None:
        return
    pidfd = os.pidfd_open(proc.pid)
    try:
        while proc.poll() is None:
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def relay_log(name: str, fd: int) -> None:
    """Copy a worker's stderr lines into our log until it closes."""
    os.set_blocking(fd, False)
    wlog = logging.getLogger(f"vmd.{name}")
    buf = b""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            wlog.info("%s", line.decode(errors="replace"))
        if len(buf) > 65536:  # a worker may not grow our memory with an endless line
            wlog.info("%s", buf.decode(errors="replace"))
            buf = b""


def _listen_unix(path: str) -> socket.socket:
    _unlink_quiet(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
