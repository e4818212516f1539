"""QEMU command line for one VM, process launch, and serial console capture."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio

QEMU_BINARY = Path("/usr/bin/qemu-system-x86_64")
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PROP = re.compile(r"^[a-z][a-z0-9_-]*$")

PropValue = str | int | bool


class QemuConfigError(ValueError):
    """A VM description QEMU must not be started with."""


@dataclass(frozen=True)
class NicBackend:
    """One virtio-net-pci NIC and what its netdev is.

    kind "vhost-user": QEMU connects to socket_path, where the vionet worker listens.
    kind "tap": QEMU's own virtio-net on a tap (the reference for benchmarks), given
    either an already open tap_fd (passed to QEMU) or an ifname QEMU opens itself.
    kind "none": a NIC with no peer at all.
    """

    kind: Literal["vhost-user", "tap", "none"]
    mac: str
    socket_path: Path | None = None
    ifname: str | None = None
    tap_fd: int | None = None
    device_props: Mapping[str, PropValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Serial:
    """Where ttyS0 goes.

    "socket": a unix stream socket; QEMU connects to path (the daemon listens) unless
    server is set, in which case QEMU listens there. "pty", "file" (output only) and
    "none" are the other kinds. logfile additionally records all output.
    """

    kind: Literal["socket", "pty", "file", "none"]
    path: Path | None = None
    server: bool = False
    logfile: Path | None = None


@dataclass(frozen=True)
class QemuVm:
    name: str
    memory_mb: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    accel: Literal["kvm", "tcg"]
    qmp_path: Path
    serial: Serial
    nics: Sequence[NicBackend] = ()
    machine: str = "q35"
    binary: Path = QEMU_BINARY
    sandbox: bool = True


def guest_cmdline(ip: str | None = None,
                  module_params: Mapping[str, Mapping[str, PropValue]] | None = None,
                  extra: Sequence[str] = ()) -> str:
    """Kernel command line for the default guest (see guest_init.sh).

    panic=-1 turns a guest panic into a reboot, which -no-reboot turns into QEMU
    exiting, so the daemon sees every guest death as a process exit.
    """
    words = ["console=ttyS0", "quiet", "panic=-1"]
    for mod, params in (module_params or {}).items():
        for key, value in params.items():
            words.append(f"{mod}.{key}={_kernel_value(value)}")
    if ip:
        words.append(f"ip={ip}")
    words.extend(extra)
    for w in words:
        if not w or any(c.isspace() for c in w):
            raise QemuConfigError(f"bad kernel command line word {w!r}")
    return " ".join(words)


def _kernel_value(v: PropValue) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _opt(v: PropValue | Path) -> str:
    """One QEMU option value: commas are doubled, booleans become on/off."""
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v).replace(",", ",,")


def _check(vm: QemuVm) -> None:
    if not _NAME.match(vm.name):
        raise QemuConfigError(f"bad VM name {vm.name!r}")
    if not 16 <= vm.memory_mb <= 1 << 20:
        raise QemuConfigError(f"bad memory size {vm.memory_mb} MB")
    if not 1 <= vm.vcpus <= 64:
        raise QemuConfigError(f"bad vcpu count {vm.vcpus}")
    if vm.accel not in ("kvm", "tcg"):
        raise QemuConfigError(f"bad accelerator {vm.accel!r}")
    for nic in vm.nics:
        if not _MAC.match(nic.mac):
            raise QemuConfigError(f"bad MAC {nic.mac!r}")
        if nic.kind == "vhost-user" and nic.socket_path is None:
            raise QemuConfigError("vhost-user NIC without socket_path")
        if nic.kind == "tap" and (nic.ifname is None) == (nic.tap_fd is None):
            raise QemuConfigError("tap NIC needs exactly one of ifname, tap_fd")
        for key in nic.device_props:
            if not _PROP.match(key) or key in ("netdev", "mac", "id"):
                raise QemuConfigError(f"bad virtio-net-pci property {key!r}")
    if vm.serial.kind in ("socket", "file") and vm.serial.path is None:
        raise QemuConfigError(f"serial {vm.serial.kind} without path")


def _serial_args(s: Serial) -> list[str]:
    if s.kind == "none":
        return ["-serial", "none"]
    if s.kind == "socket":
        spec = f"socket,id=ser0,path={_opt(s.path or '')}"
        if s.server:
            spec += ",server=on,wait=off"
    elif s.kind == "file":
        spec = f"file,id=ser0,path={_opt(s.path or '')}"
    else:
        spec = "pty,id=ser0"
    if s.logfile is not None:
        spec += f",logfile={_opt(s.logfile)},logappend=on"
    return ["-chardev", spec, "-serial", "chardev:ser0"]


def _nic_args(i: int, nic: NicBackend) -> list[str]:
    args: list[str] = []
    dev = f"virtio-net-pci,id=nic{i},mac={nic.mac}"
    if nic.kind == "vhost-user":
        args += ["-chardev", f"socket,id=chr{i},path={_opt(nic.socket_path or '')}",
                 "-netdev", f"vhost-user,id=net{i},chardev=chr{i}"]
        dev += f",netdev=net{i}"
    elif nic.kind == "tap":
        src = f"fd={nic.tap_fd}" if nic.tap_fd is not None else f"ifname={_opt(nic.ifname or '')}"
        args += ["-netdev", f"tap,id=net{i},{src},script=no,downscript=no,vhost=off"]
        dev += f",netdev=net{i}"
    # No option ROM: the guest boots with -kernel, never from the network.
    props: dict[str, PropValue] = {"romfile": "", **nic.device_props}
    dev += "".join(f",{k}={_opt(v)}" for k, v in props.items())
    return [*args, "-device", dev]


def build_argv(vm: QemuVm) -> list[str]:
    """The full QEMU argv for vm (raises QemuConfigError on a bad description)."""
    _check(vm)
    # Shared memfd memory is what a vhost-user backend maps; it costs nothing for
    # other backends, so every VM gets the same memory layout.
    argv = [
        str(vm.binary),
        "-name", f"{vm.name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-machine", f"{vm.machine},memory-backend=mem",
        "-object", f"memory-backend-memfd,id=mem,size={vm.memory_mb}M,share=on",
        "-m", f"{vm.memory_mb}M",
        "-accel", vm.accel,
        "-cpu", "max" if vm.accel == "tcg" else "host",
        "-smp", str(vm.vcpus),
        "-kernel", _opt(vm.kernel),
        "-initrd", _opt(vm.initrd),
        "-append", vm.cmdline,
        "-qmp", f"unix:{_opt(vm.qmp_path)},server=on,wait=off",
        # Guest reboot ends QEMU: the daemon decides whether to start it again.
        "-no-reboot",
    ]
    if vm.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += _serial_args(vm.serial)
    for i, nic in enumerate(vm.nics):
        argv += _nic_args(i, nic)
    return argv


def pass_fds(vm: QemuVm) -> tuple[int, ...]:
    """File descriptors QEMU must inherit for vm (tap fds named by number in argv)."""
    return tuple(n.tap_fd for n in vm.nics if n.kind == "tap" and n.tap_fd is not None)


async def start_qemu(vm: QemuVm, stderr_path: Path | None = None,
                     extra_fds: Sequence[int] = (), netns: Path | None = None) -> trio.Process:
    """Start QEMU for vm; its stdout/stderr go to stderr_path (or are discarded).

    netns (e.g. /run/netns/NAME) names the network namespace QEMU runs in. Without
    it QEMU inherits the namespace of whichever trio worker thread spawns it, which
    is not necessarily the caller's: setns() is per thread.
    """
    argv = build_argv(vm)
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    out = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600) \
        if stderr_path is not None else subprocess.DEVNULL
    try:
        return await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            pass_fds=(*pass_fds(vm), *extra_fds))
    finally:
        if stderr_path is not None:
            os.close(out)


async def console_listener(path: Path) -> trio.SocketListener:
    """A listening unix socket QEMU's serial chardev (Serial kind "socket") connects to."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        await sock.bind(str(path))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class Console:
    """Serial console of one guest: keeps every byte, optionally logs, finds text."""

    def __init__(self, stream: trio.abc.Stream, logfile: Path | None = None) -> None:
        self._stream = stream
        self._log = logfile.open("ab") if logfile is not None else None
        self._buf = bytearray()
        self._changed = trio.Event()
        self.closed = False

    @property
    def output(self) -> bytes:
        return bytes(self._buf)

    def text(self) -> str:
        return self._buf.decode(errors="replace")

    async def run(self) -> None:
        """Read until the guest side closes (QEMU exits); run this in a nursery."""
        try:
            while data := await self._stream.receive_some(65536):
                self._buf.extend(data)
                if self._log is not None:
                    self._log.write(data)
                    self._log.flush()
                self._changed.set()
                self._changed = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            self._changed.set()
            if self._log is not None:
                self._log.close()

    async def wait_for(self, pattern: bytes | re.Pattern[bytes], start: int = 0) -> int:
        """Offset just past the first match at or after start (wrap in trio.fail_after)."""
        while True:
            if isinstance(pattern, bytes):
                pos = self._buf.find(pattern, start)
                end = pos + len(pattern)
            else:
                m = pattern.search(self._buf, start)
                pos, end = (m.start(), m.end()) if m else (-1, -1)
            if pos >= 0:
                return end
            if self.closed:
                raise EOFError(f"console closed before {pattern!r} appeared")
            await self._changed.wait()

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def run_command(self, command: str) -> str:
        """Type command into the guest shell and return its output.

        The end marker is computed by the shell ($((...))), so the echoed command
        line itself never matches it.
        """
        tag = os.urandom(4).hex()
        start = len(self._buf)
        await self.send(f"echo B{tag}$((1+1)); {command}; echo E{tag}$((1+1))\n".encode())
        begin = await self.wait_for(f"B{tag}2".encode(), start)
        end = await self.wait_for(f"E{tag}2".encode(), begin)
        body = self._buf[begin : end - len(f"E{tag}2")]
        return body.decode(errors="replace").replace("\r\n", "\n").strip("\n")
