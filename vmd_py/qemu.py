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
# Under TCG, "max" makes a guest ~3x slower at networking than the baseline model (measured:
# 1.2 vs 3.5-4.2 Gbit/s TCP, same guest, same device): its extended register state is costly to
# emulate on every context switch. qemu64 boots the default guest and runs it fastest.
TCG_CPU = "qemu64"
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
class DriveBackend:
    """A disk or cdrom image QEMU gets as an already open fd (``-add-fd``), never by path:
    QEMU runs unprivileged and must not need permission on the image file itself.

    QEMU picks the fd of a set whose access mode matches each open it makes, and it opens a
    writable image read-only too: a writable drive needs an O_RDWR and an O_RDONLY fd.
    """

    fds: tuple[int, ...]
    fdset: int
    format: Literal["raw", "qcow2"] = "raw"
    readonly: bool = False


BootFrom = Literal["kernel", "disk", "cdrom", "net"]


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
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    accel: Literal["kvm", "tcg"]
    qmp_path: Path
    serial: Serial
    nics: Sequence[NicBackend] = ()
    machine: str = "q35"
    binary: Path = QEMU_BINARY
    sandbox: bool = True
    disks: Sequence[DriveBackend] = ()
    cdrom: DriveBackend | None = None
    # "kernel": -kernel/-initrd (direct Linux boot); otherwise the firmware boots that device.
    boot: BootFrom = "kernel"


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
    _check_boot(vm)


def _check_boot(vm: QemuVm) -> None:
    drives = [*vm.disks, *([vm.cdrom] if vm.cdrom else [])]
    if len(vm.disks) > 4:
        raise QemuConfigError(f"too many disks: {len(vm.disks)}")
    sets = [d.fdset for d in drives]
    if len(set(sets)) != len(sets) or any(
            not d.fds or min(d.fds) < 3 or d.fdset < 0 for d in drives):
        raise QemuConfigError("drive fds must be >= 3 and fd sets distinct")
    if any(d.format not in ("raw", "qcow2") for d in drives):
        raise QemuConfigError("drive format must be raw or qcow2")
    if vm.boot == "kernel" and vm.kernel is None:
        raise QemuConfigError("kernel boot without a kernel")
    if vm.boot == "disk" and not vm.disks:
        raise QemuConfigError("boot device disk without a disk")
    if vm.boot == "cdrom" and vm.cdrom is None:
        raise QemuConfigError("boot device cdrom without a cdrom")
    if vm.boot == "net" and not vm.nics:
        raise QemuConfigError("boot device net without a network interface")


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


def _drive_args(vm: QemuVm) -> list[str]:
    args: list[str] = []
    for i, d in enumerate(vm.disks):
        for fd in d.fds:
            args += ["-add-fd", f"fd={fd},set={d.fdset}"]
        args += ["-drive", f"if=none,id=disk{i},file=/dev/fdset/{d.fdset},format={d.format}"
                 f",read-only={_opt(d.readonly)}",
                 "-device", f"virtio-blk-pci,id=vblk{i},drive=disk{i}"
                 + (",bootindex=1" if vm.boot == "disk" and i == 0 else "")]
    if vm.cdrom is not None:
        c = vm.cdrom
        # q35's built-in AHCI controller (ide.0) carries the ATAPI drive, as on real hardware.
        for fd in c.fds:
            args += ["-add-fd", f"fd={fd},set={c.fdset}"]
        args += ["-drive", f"if=none,id=cd0,file=/dev/fdset/{c.fdset},format={c.format}"
                 ",media=cdrom,read-only=on",
                 "-device", "ide-cd,id=cdrom0,drive=cd0,bus=ide.0"
                 + (",bootindex=1" if vm.boot == "cdrom" else "")]
    return args


def _nic_args(i: int, nic: NicBackend, netboot: bool = False) -> list[str]:
    args: list[str] = []
    dev = f"virtio-net-pci,id=nic{i},mac={nic.mac}"
    if nic.kind == "vhost-user":
        # reconnect-ms: when a vionet worker dies, QEMU reconnects to its successor (the
        # parent keeps the listening socket) and renegotiates; the guest keeps running.
        args += ["-chardev", f"socket,id=chr{i},path={_opt(nic.socket_path or '')},"
                 "reconnect-ms=500",
                 "-netdev", f"vhost-user,id=net{i},chardev=chr{i}"]
        dev += f",netdev=net{i}"
    elif nic.kind == "tap":
        src = f"fd={nic.tap_fd}" if nic.tap_fd is not None else f"ifname={_opt(nic.ifname or '')}"
        args += ["-netdev", f"tap,id=net{i},{src},script=no,downscript=no,vhost=off"]
        dev += f",netdev=net{i}"
    # No option ROM unless this NIC is the boot device: the ROM is only needed for PXE.
    props: dict[str, PropValue] = {**({} if netboot else {"romfile": ""}), **nic.device_props}
    if netboot:
        props["bootindex"] = 1
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
        "-cpu", TCG_CPU if vm.accel == "tcg" else "host",
        "-smp", str(vm.vcpus),
    ]
    if vm.boot == "kernel":
        argv += ["-kernel", _opt(vm.kernel or "")]
        if vm.initrd is not None:
            argv += ["-initrd", _opt(vm.initrd)]
        argv += ["-append", vm.cmdline]
    argv += [
        "-qmp", f"unix:{_opt(vm.qmp_path)},server=on,wait=off",
        # Guest reboot ends QEMU: the daemon decides whether to start it again.
        "-no-reboot",
    ]
    if vm.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += _serial_args(vm.serial)
    argv += _drive_args(vm)
    for i, nic in enumerate(vm.nics):
        argv += _nic_args(i, nic, netboot=vm.boot == "net" and i == 0)
    return argv


def pass_fds(vm: QemuVm) -> tuple[int, ...]:
    """File descriptors QEMU must inherit for vm (tap and drive fds named by number in argv)."""
    taps = tuple(n.tap_fd for n in vm.nics if n.kind == "tap" and n.tap_fd is not None)
    drives = tuple(fd for d in [*vm.disks, *([vm.cdrom] if vm.cdrom else [])] for fd in d.fds)
    return taps + drives


QCOW2_MAGIC = b"QFI\xfb"


def image_format(fd: int) -> Literal["raw", "qcow2"]:
    """qcow2 if the image starts with qcow2's magic, else raw (as vmd guesses)."""
    return "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"


def qcow2_backing_file(fd: int) -> bool:
    """Whether a qcow2 image names a backing file (QEMU would open it by path itself)."""
    header = os.pread(fd, 20, 0)
    return len(header) == 20 and int.from_bytes(header[8:16], "big") != 0


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
