"""The vmd parent process: configuration, switches, the control process, and its requests."""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import logging
import logging.handlers
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from imsg.catalogue import PARENT_FROM_CONTROL, MsgType
from imsg.channel import ImsgSocket, TrioImsgChannel, socketpair
from imsg.codec import Imsg
from imsg.errors import ImsgError
from parent import bridge
from parent.options import OptionError, owns, start_conf
from parent.spawn import EMPTY_ROOT, SANDBOX_USER, ensure_empty_root
from parent.supervisor import Parent, relay_log, wait_process
from parent.vm import VmError, VmManager
from vmd_py.config import ConfigError, load
from vmd_py.config.model import Config

log = logging.getLogger("vmd")

DEFAULT_CONF = "/etc/vm.conf"
DEFAULT_SOCKET = "/run/vmd.sock"
GLOBAL_REQUESTS = frozenset(
    {MsgType.CTL_RELOAD, MsgType.CTL_LOAD, MsgType.CTL_RESET, MsgType.CTL_LOG}
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vmd", description="virtual machine daemon")
    p.add_argument("-d", action="store_true", help="do not daemonize; log to stderr")
    p.add_argument("-f", dest="file", default=DEFAULT_CONF, help="configuration file")
    p.add_argument("-n", action="store_true", help="check the configuration and exit")
    p.add_argument("-s", dest="socket", default=DEFAULT_SOCKET, help="control socket")
    p.add_argument("-v", action="count", default=0, help="verbose logging")
    p.add_argument("-P", dest="no_placement", action="store_true",
                   help="no CPU placement: leave vCPU and vionet threads to the scheduler")
    return p.parse_args(argv)


class Daemon:
    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        self.args = args
        self.config = config
        self.parent = Parent()
        self.vms = VmManager(self.parent, config, placement=not args.no_placement)
        self.control: TrioImsgChannel | None = None
        self.control_proc: subprocess.Popen[bytes] | None = None

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.parent.run)
                await nursery.start(self.vms.run)
                self._switches(self.config)
                await self._start_control(nursery)
                nursery.start_soon(self._start_enabled)
                async for sig in sigs:
                    if sig == signal.SIGHUP:
                        await self.reload(self.args.file)
                        continue
                    log.info("vmd: exiting on signal %d", sig)
                    nursery.cancel_scope.cancel()
                    break
        self._cleanup_socket()

    def _switches(self, config: Config) -> None:
        for sw in config.switches.values():
            if sw.enabled:
                bridge.ensure_bridge(sw.ifname, up=sw.up)

    async def _start_enabled(self) -> None:
        names = [name for name, conf in self.config.vms.items() if conf.enabled]
        cfg = self.config
        if not cfg.staggered_start or not cfg.staggered_parallel:
            for name in names:
                await self._start_logged(name)
            return
        # staggered start: `parallel` VMs at a time, `delay` seconds between the groups.
        step = cfg.staggered_parallel
        for i in range(0, len(names), step):
            if i:
                await trio.sleep(cfg.staggered_delay)
            log.info("staggered start: %s", " ".join(names[i : i + step]))
            async with trio.open_nursery() as nursery:
                for name in names[i : i + step]:
                    nursery.start_soon(self._start_logged, name)

    async def _start_logged(self, name: str) -> None:
        try:
            await self.vms.start(name)
        except (VmError, OSError) as exc:
            log.error("%s: start failed: %s", name, exc)

    # --- control process ----------------------------------------------------------------------

    def _bind_socket(self) -> socket.socket:
        path = self.args.socket
        self._cleanup_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(path)
        owner = self.config.socket_owner
        uid = pwd.getpwnam(owner.user).pw_uid if owner.user and not owner.user.isdigit() \
            else int(owner.user or 0)
        gid = grp.getgrnam(owner.group).gr_gid if owner.group and not owner.group.isdigit() \
            else int(owner.group or 0)
        os.chown(path, uid, gid)
        # Like vmd: owner and group may talk to vmd; who may do what is checked per request.
        os.chmod(path, 0o660)
        sock.listen(16)
        return sock

    def _cleanup_socket(self) -> None:
        try:
            if Path(self.args.socket).is_socket():
                os.unlink(self.args.socket)
        except OSError:
            pass

    async def _start_control(self, nursery: trio.Nursery) -> None:
        ensure_empty_root(EMPTY_ROOT)
        listener = self._bind_socket()
        mine, theirs = socketpair()
        self.control_proc = subprocess.Popen(
            [sys.executable, "-m", "vmd_py.control", "--imsg-fd", str(theirs.fileno()),
             "--listen-fd", str(listener.fileno()), "--user", SANDBOX_USER],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(theirs.fileno(), listener.fileno()), close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        )
        theirs.close()
        listener.close()
        if self.control_proc.stderr is not None:
            nursery.start_soon(relay_log, "control", self.control_proc.stderr.fileno())
        chan = TrioImsgChannel(ImsgSocket(mine, PARENT_FROM_CONTROL), role="parent")
        nursery.start_soon(self._watch_control, nursery)
        try:
            with trio.fail_after(20):
                await chan.hello()
        except (ImsgError, EOFError, OSError, trio.TooSlowError) as exc:
            # Dead before it said hello: the watcher replaces it; the daemon stays up.
            log.error("control process failed its handshake: %s", exc)
            chan.close()
            self.control_proc.kill()
            return
        self.control = chan
        nursery.start_soon(self._serve_control, chan, nursery)

    async def _watch_control(self, nursery: trio.Nursery) -> None:
        """A control process that dies is replaced (socket rebound): vmctl must keep working."""
        proc = self.control_proc
        assert proc is not None
        try:
            await wait_process(proc)
            log.error("control process exited with %s; restarting it", proc.returncode)
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await wait_process(proc)
        await trio.sleep(1)  # never a hot loop if it dies at once
        await self._start_control(nursery)

    async def _serve_control(self, chan: TrioImsgChannel, nursery: trio.Nursery) -> None:
        while True:
            try:
                msg = await chan.receive()
            except ImsgError as exc:
                log.warning("refused message from control: %s", exc)
                await chan.send_error(exc.kind.value, str(exc))
                continue
            except EOFError:
                return
            nursery.start_soon(self._request, chan, msg)

    async def _request(self, chan: TrioImsgChannel, msg: Imsg) -> None:
        try:
            reply = await self.handle(msg)
        except VmError as exc:
            reply = _result(False, str(exc), exc.code)
        except (OSError, ValueError, RuntimeError, trio.TooSlowError) as exc:
            log.exception("request %s failed", msg.type.name)
            reply = _result(False, f"{msg.type.name}: {exc}", errno.EIO)
        reply.peerid = msg.peerid
        await chan.send(reply)

    def _check_owner(self, name: str, uid: int, gid: int) -> None:
        if uid == 0:
            return
        conf = self.vms.vms[name].conf if name in self.vms.vms else self.vms.conf_for(name)
        if owns(conf.owner_user, conf.owner_group, uid, gid):
            return
        raise VmError(f"{name}: permission denied", errno.EPERM)

    async def handle(self, msg: Imsg) -> Imsg:
        p = msg.payload
        uid, gid = int(p.get("uid", 0)), int(p.get("gid", 0))
        t = msg.type
        if t in GLOBAL_REQUESTS and uid != 0:
            return _result(False, "permission denied", errno.EPERM)
        if t is MsgType.CTL_STATUS:
            entries = await self.vms.status(p["name"])
            return Imsg(MsgType.CTL_STATUS_RESULT, {"vms": {"list": entries}})
        if t is MsgType.CTL_STOP and p["all"]:
            return await self._stop_all(p["force"], p["wait"], uid, gid)
        if t is MsgType.CTL_START:
            return await self._start(p["name"], p.get("options") or {}, uid, gid)
        if t in (MsgType.CTL_STOP, MsgType.CTL_PAUSE, MsgType.CTL_UNPAUSE,
                 MsgType.CTL_WAIT, MsgType.CTL_CONSOLE):
            self._check_owner(p["name"], uid, gid)
        if t is MsgType.CTL_STOP:
            await self.vms.stop(p["name"], force=p["force"], wait=p["wait"])
            return _result(True, f"sent request to terminate vm {p['name']}")
        if t is MsgType.CTL_PAUSE:
            await self.vms.pause(p["name"], True)
            return _result(True, f"paused vm {p['name']}")
        if t is MsgType.CTL_UNPAUSE:
            await self.vms.pause(p["name"], False)
            return _result(True, f"unpaused vm {p['name']}")
        if t is MsgType.CTL_WAIT:
            await self.vms.wait(p["name"])
            return _result(True, f"vm {p['name']} terminated")
        if t is MsgType.CTL_CONSOLE:
            vm = self.vms.get(p["name"])
            if not vm.tty:
                return _result(False, f"{p['name']}: no console", errno.ENOENT)
            return _result(True, vm.tty)
        if t is MsgType.CTL_RELOAD:
            return await self.reload(self.args.file)
        if t is MsgType.CTL_LOAD:
            return await self.reload(p["path"], keep=True)
        if t is MsgType.CTL_LOG:
            logging.getLogger().setLevel(logging.DEBUG if p["verbose"] else logging.INFO)
            return _result(True, "log " + ("verbose" if p["verbose"] else "brief"))
        if t is MsgType.CTL_RESET:
            return await self.reset(p["what"])
        return _result(False, f"{t.name}: not supported", errno.EOPNOTSUPP)

    async def _start(self, name: str, options: dict[str, Any], uid: int, gid: int) -> Imsg:
        existing = self.vms.known_conf(name)
        if existing is not None and "template" not in options:
            self._check_owner(name, uid, gid)
        try:
            conf = start_conf(self.config, name, existing, options, uid, gid)
        except OptionError as exc:
            return _result(False, str(exc), exc.code)
        vm = await self.vms.start(name, conf)
        return _result(True, f"started vm {vm.vm_id} successfully, tty {vm.tty or '-'}")

    async def _stop_all(self, force: bool, wait: bool, uid: int, gid: int) -> Imsg:
        """stop -a: every running VM the client may stop (all of them for root)."""
        async with trio.open_nursery() as nursery:
            for name, vm in list(self.vms.vms.items()):
                if vm.proc is None or vm.proc.returncode is not None:
                    continue
                if uid != 0 and not owns(vm.conf.owner_user, vm.conf.owner_group, uid, gid):
                    continue
                nursery.start_soon(self._stop_quietly, name, force, wait)
        return _result(True, "stopped all VMs")

    async def _stop_quietly(self, name: str, force: bool, wait: bool) -> None:
        with contextlib.suppress(VmError):
            await self.vms.stop(name, force=force, wait=wait)

    async def reload(self, path: str, keep: bool = False) -> Imsg:
        """Re-read the configuration (``keep``: add to it, as vmctl load does)."""
        try:
            new = await trio.to_thread.run_sync(load, path)
        except ConfigError as exc:
            log.error("reload: %s", exc)
            return _result(False, str(exc), errno.EINVAL)
        if keep:
            merged = self.config
            merged.switches.update(new.switches)
            merged.vms.update(new.vms)
        else:
            merged = new
            self.config = new
            # vmctl reload: stopped VMs go; running ones keep their configuration until
            # they stop.
            self.vms.forget_stopped()
        self.vms.config = merged
        self._switches(merged)
        for name, conf in new.vms.items():
            running = self.vms.vms.get(name)
            if conf.enabled and (running is None or running.proc is None
                                 or running.proc.returncode is not None):
                try:
                    await self.vms.start(name)
                except VmError as exc:
                    log.error("%s: start failed: %s", name, exc)
        return _result(True, f"{'loaded' if keep else 'reloaded'} {path}")

    async def reset(self, what: str) -> Imsg:
        if what not in ("all", "vms", "switches"):
            return _result(False, f"reset {what}: unknown", errno.EINVAL)
        if what in ("all", "vms"):
            for name, vm in list(self.vms.vms.items()):
                if vm.proc is not None and vm.proc.returncode is None:
                    await self.vms.stop(name, force=True, wait=True)
        if what in ("all", "switches"):
            for sw in self.config.switches.values():
                bridge.delete_link(sw.ifname)
            self._switches(self.config)
        return _result(True, f"reset {what}")


def _result(ok: bool, message: str, code: int = 0) -> Imsg:
    return Imsg(MsgType.CTL_RESULT, {"ok": ok, "code": code, "message": message[:4000]})


def _setup_logging(foreground: bool, verbose: int) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if foreground:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    handler: logging.Handler
    try:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmd[%(process)d]: %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.n:
        print("configuration OK")
        return 0
    if os.geteuid() != 0:
        print("vmd: need root privileges", file=sys.stderr)
        return 1
    if not args.d:
        _daemonize()
    _setup_logging(args.d, args.v)
    daemon = Daemon(args, config)
    trio.run(daemon.run)
    return 0
