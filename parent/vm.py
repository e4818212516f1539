"""VM lifecycle in the parent: NICs, the QEMU process (unprivileged), QMP, restarts.

QEMU runs as the ``_vmdvm`` user (not the workers' ``_vmd``, so a compromised QEMU cannot signal
or ptrace a vionet worker) in fresh, empty network/IPC/UTS namespaces, with its own
``-sandbox on``. It reaches the outside only through vhost-user sockets in a private runtime
directory, its QMP socket and its serial pty.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from imsg.catalogue import MsgType
from imsg.codec import Imsg
from parent.local import LocalAddressError, local_addrs_for
from parent.placement import Placement, Placer, pin_threads, vcpu_thread_ids
from parent.supervisor import NicSpec, Parent, relay_log, wait_process
from vmd_py.accel import probe_accel
from vmd_py.config.model import MAX_DISKS, Config, NicConf, VmConf
from vmd_py.guest_image import ensure_guest_image
from vmd_py.qemu import (
    DriveBackend,
    NicBackend,
    QemuConfigError,
    QemuVm,
    Serial,
    build_argv,
    guest_cmdline,
    image_format,
    pass_fds,
    qcow2_backing_file,
)
from vmd_py.qmp import QmpClient, QmpError, qmp_connect
from vmd_py.virtio_defs import NetF, TunF, flag_names

log = logging.getLogger("vmd.vm")

QEMU_USER = "_vmdvm"
RUN_DIR = Path("/run/vmd-py")
FORCE_STOP_GRACE = 10.0
# vmd's start rate limit: a start less than RESTART_WINDOW s after the previous one counts as
# quick; the RESTART_LIMIT-th quick start in a row is refused. A slower start resets the count.
RESTART_WINDOW = 6.0
RESTART_LIMIT = 3


class VmError(Exception):
    """A request about a VM that cannot be carried out (with an errno for vmctl)."""

    def __init__(self, message: str, code: int = 22) -> None:
        super().__init__(message)
        self.code = code


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


@dataclass
class NicRun:
    spec: NicSpec
    conf: NicConf
    switch: str | None


@dataclass
class VmRun:
    conf: VmConf
    vm_id: int
    state: State = State.STOPPED
    proc: subprocess.Popen[bytes] | None = None
    qmp: QmpClient | None = None
    tty: str | None = None
    nics: list[NicRun] = field(default_factory=list)
    rundir: Path | None = None
    owner_uid: int | None = None
    owner_gid: int | None = None
    quick_starts: int = 0
    stop_requested: bool = False
    shutdown_reason: str | None = None  # from QMP's SHUTDOWN event
    placement: Placement | None = None  # CPUs for its vCPU and its workers (None: anywhere)
    exited: trio.Event = field(default_factory=trio.Event)
    started_at: float | None = None
    fds: list[int] = field(default_factory=list)  # image fds open only until QEMU has them

    @property
    def name(self) -> str:
        return self.conf.name


def _mac_for(vm_id: int, index: int) -> str:
    # vmd's locally administered prefix fe:e1:ba; the rest from the VM id and NIC index.
    return f"fe:e1:ba:d0:{vm_id & 0xFF:02x}:{index & 0xFF:02x}"


def _resolve_owner(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    uid = gid = None
    if user is not None:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    if group is not None:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


async def _relay_stderr(name: str, stream: IO[bytes]) -> None:
    # The relay owns the pipe: closing it elsewhere while it waits on the fd (a reboot's
    # cleanup) would hand the number to the next QEMU's pipe under its feet.
    try:
        await relay_log(name, stream.fileno())
    finally:
        stream.close()


class VmManager:
    def __init__(self, parent: Parent, config: Config, *, qemu_user: str = QEMU_USER,
                 run_dir: Path | None = None, placement: bool = True) -> None:
        self.parent = parent
        self.config = config
        self.qemu_user = qemu_user
        # One directory per daemon: two vmd instances (tests, demos) never share VM dirs.
        self.run_dir = run_dir or RUN_DIR / str(os.getpid())
        self.vms: dict[str, VmRun] = {}
        self._next_id = 1
        self._accel: str | None = None
        self._nursery: trio.Nursery | None = None
        self._taps_in_use: set[str] = set()
        self._placer = Placer() if placement else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    for vm in list(self.vms.values()):
                        if vm.proc is not None and vm.proc.returncode is None:
                            await self._kill(vm)
                        await self._cleanup(vm)
                    shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- queries ----------------------------------------------------------------------------

    def get(self, name: str) -> VmRun:
        vm = self.vms.get(name)
        if vm is None:
            raise VmError(f"{name}: unknown VM", 2)  # ENOENT
        return vm

    def conf_for(self, name: str) -> VmConf:
        conf = self.config.vms.get(name)
        if conf is None:
            raise VmError(f"{name}: not defined in vm.conf", 2)
        return conf

    async def status(self, name: str = "", verbose: bool = True) -> list[dict[str, Any]]:
        out = []
        names = [name] if name else sorted(
            set(self.config.vms) | set(self.vms), key=lambda n: self._id_of(n)
        )
        for n in names:
            vm = self.vms.get(n)
            conf = vm.conf if vm else self.conf_for(n)
            running = vm is not None and vm.proc is not None and vm.proc.returncode is None
            entry: dict[str, Any] = {
                "id": vm.vm_id if vm else 0,
                "name": n,
                "pid": vm.proc.pid if running and vm and vm.proc else 0,
                "vcpus": 1,
                "maxmem": conf.memory_bytes,
                "curmem": conf.memory_bytes if running else 0,
                "tty": (vm.tty if vm and running else None) or "-",
                "owner": conf.owner_user or "root",
                "state": vm.state.value if vm else State.STOPPED.value,
                "nics": [],
            }
            if vm and running and verbose:
                entry["nics"] = [await self._nic_status(nic) for nic in vm.nics]
                if vm.placement is not None:
                    entry["cpus"] = {"vcpus": sorted(vm.placement.vcpus),
                                     "vionet": sorted(vm.placement.devices)}
            out.append(entry)
        return out

    def _id_of(self, name: str) -> int:
        vm = self.vms.get(name)
        return vm.vm_id if vm else 1 << 30

    async def _nic_status(self, nic: NicRun) -> dict[str, Any]:
        runtime = self.parent.nics.get(nic.spec.name)
        entry: dict[str, Any] = {
            "name": nic.spec.name, "tap": nic.spec.tap, "switch": nic.switch,
            "lladdr": nic.spec.mac, "locked": nic.spec.locked, "offload_setting": nic.spec.offload,
            "poll_us": nic.spec.poll_us,
            "vionet_pid": None, "features_offered": [], "features_acked": [], "tap_offload": [],
            "counters": {}, "parent_counters": {},
        }
        if runtime is None:
            return entry
        entry["vionet_pid"] = runtime.pid
        entry["tap_offload"] = flag_names(runtime.tap.read_offload(), TunF)
        entry["parent_counters"] = dict(runtime.counters)
        if runtime.chan is not None:
            try:
                stats = await self.parent.request(nic.spec.name, Imsg(MsgType.STATS_REQUEST, {}),
                                                  timeout=3)
            except (RuntimeError, trio.TooSlowError) as exc:
                entry["error"] = str(exc)
            else:
                if stats.type is MsgType.STATS:
                    entry["features_offered"] = flag_names(stats.payload["features_offered"], NetF)
                    entry["features_acked"] = flag_names(stats.payload["features_acked"], NetF)
                    entry["counters"] = stats.payload["counters"]
                    entry["paused"] = stats.payload["paused"]
        return entry

    # --- start ------------------------------------------------------------------------------

    def known_conf(self, name: str) -> VmConf | None:
        """The configuration ``name`` would start with: a started VM's own (ad-hoc VMs and
        instances have no vm.conf entry), else vm.conf's."""
        vm = self.vms.get(name)
        return vm.conf if vm is not None else self.config.vms.get(name)

    def forget_stopped(self) -> None:
        """Drop stopped VMs (vmctl reload), so that only the new vm.conf's remain."""
        for name, vm in list(self.vms.items()):
            if vm.state is State.STOPPED:
                del self.vms[name]

    async def start(self, name: str, conf: VmConf | None = None) -> VmRun:
        conf = conf or self.known_conf(name) or self.conf_for(name)
        vm = self.vms.get(name)
        if vm is not None and vm.state is not State.STOPPED:
            raise VmError(f"{name}: VM is already running", 16)  # EBUSY
        if vm is not None and vm.started_at is not None:
            quick = time.monotonic() - vm.started_at < RESTART_WINDOW
            vm.quick_starts = vm.quick_starts + 1 if quick else 0
            if vm.quick_starts >= RESTART_LIMIT:
                log.warning("%s: restarted too quickly", name)
                raise VmError(f"{name}: restarted too quickly", 1)  # EPERM, as vmd
        if vm is None:
            vm = VmRun(conf, self._next_id)
            self._next_id += 1
            self.vms[name] = vm
        vm.conf = conf
        vm.state = State.STARTING
        vm.stop_requested = False
        vm.shutdown_reason = None
        vm.exited = trio.Event()
        try:
            await self._launch(vm)
        except BaseException:
            await self._cleanup(vm)
            vm.state = State.STOPPED
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._monitor, vm)
        return vm

    def _alloc_tap(self, wanted: str | None) -> str:
        if wanted:
            if wanted in self._taps_in_use:
                raise VmError(f"tap {wanted} is in use", 16)
            self._taps_in_use.add(wanted)
            return wanted
        for i in range(4096):
            cand = f"tap{i}"
            if cand not in self._taps_in_use and not os.path.exists(f"/sys/class/net/{cand}"):
                self._taps_in_use.add(cand)
                return cand
        raise VmError("no free tap names", 23)

    async def _launch(self, vm: VmRun) -> None:
        conf = vm.conf
        try:
            vm.owner_uid, vm.owner_gid = _resolve_owner(conf.owner_user, conf.owner_group)
        except KeyError as exc:
            raise VmError(f"{vm.name}: unknown owner {exc}") from exc
        qemu_pw = pwd.getpwnam(self.qemu_user)
        rundir = self.run_dir / vm.name
        shutil.rmtree(rundir, ignore_errors=True)
        rundir.mkdir(parents=True, mode=0o700)
        os.chown(rundir, qemu_pw.pw_uid, qemu_pw.pw_gid)
        vm.rundir = rundir

        backends: list[NicBackend] = []
        vm.nics = []
        vm.placement = self._placer.place() if self._placer else None
        for index, nconf in enumerate(conf.interfaces):
            switch = self.config.nic_switch(nconf)
            spec = NicSpec(
                name=f"{vm.name}.{index}",
                tap=self._alloc_tap(nconf.tap_name),
                switch=switch.ifname if switch else None,
                offload=nconf.offload,
                poll_us=nconf.poll_us,
                mac=nconf.lladdr or _mac_for(vm.vm_id, index),
                locked=self.config.nic_locked(nconf),
                vhost_path=str(rundir / f"net{index}.sock"),
                cpus=vm.placement.devices if vm.placement else None,
            )
            # --- local interface (parent/local.py): the NIC's /31; the supervisor puts the
            # host side on the tap and hands both addresses to the worker for its DHCP.
            try:
                spec.local = local_addrs_for(self.config, nconf, vm.vm_id, index)
            except LocalAddressError as exc:
                raise VmError(f"{vm.name}: {exc}") from exc
            # --- end local interface
            vm.nics.append(NicRun(spec, nconf, spec.switch))
            await self.parent.add_nic(spec)
            os.chown(spec.vhost_path or "", qemu_pw.pw_uid, qemu_pw.pw_gid)
            backends.append(NicBackend("vhost-user", spec.mac or "", Path(spec.vhost_path or "")))

        kernel: Path | None = None
        initrd: Path | None = None
        if conf.boot_device is None:
            # Direct Linux boot. A kernel without an initrd of its own (vmctl start -b) gets
            # the default guest's initrd, so that `-b` alone boots a usable system.
            if conf.kernel is None or conf.initrd is None:
                image = await trio.to_thread.run_sync(ensure_guest_image)
                kernel, initrd = image.kernel, image.initrd
            if conf.kernel is not None:
                kernel = Path(conf.kernel)
            if conf.initrd is not None:
                initrd = Path(conf.initrd)
        disks, cdrom = self._open_drives(vm)
        if self._accel is None:
            self._accel = await trio.to_thread.run_sync(probe_accel)
        qemu = QemuVm(
            name=vm.name,
            memory_mb=max(conf.memory_bytes // (1024 * 1024), 64),
            vcpus=1,
            kernel=kernel,
            initrd=initrd,
            cmdline=conf.cmdline or guest_cmdline(),
            accel="kvm" if self._accel == "kvm" else "tcg",
            qmp_path=rundir / "qmp.sock",
            serial=Serial("pty", logfile=rundir / "console.log"),
            nics=backends,
            disks=disks,
            cdrom=cdrom,
            boot=conf.boot_device or "kernel",
        )
        try:
            argv = [sys.executable, "-m", "vmd_py.sandbox_exec", self.qemu_user, "--",
                    *build_argv(qemu)]
        except QemuConfigError as exc:
            raise VmError(f"{vm.name}: {exc}") from exc
        try:
            # The image fds keep their numbers in QEMU (-add-fd fd=N names them) and survive
            # sandbox_exec's execv: inherited fds are not close-on-exec.
            vm.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, close_fds=True, pass_fds=pass_fds(qemu),
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            self._close_fds(vm)
        vm.started_at = time.monotonic()
        log.info("%s: started QEMU pid %d (%s)", vm.name, vm.proc.pid, qemu.accel)
        assert self._nursery is not None
        if vm.proc.stderr is not None:
            self._nursery.start_soon(_relay_stderr, f"qemu.{vm.name}", vm.proc.stderr)
        vm.qmp = await self._connect_qmp(vm, rundir / "qmp.sock")
        await self._pin_vcpus(vm, vm.qmp)
        vm.tty = await self._find_pty(vm.qmp)
        if vm.tty and vm.owner_uid is not None:
            os.chown(vm.tty, vm.owner_uid, -1)
        vm.state = State.RUNNING

    def _open_drives(self, vm: VmRun) -> tuple[list[DriveBackend], DriveBackend | None]:
        """Open the VM's images here, as root (disks read-write, the cdrom read-only): QEMU
        gets the fds and never needs permission on the files."""
        disks: list[DriveBackend] = []
        cdrom = None
        try:
            for i, disk in enumerate(vm.conf.disks):
                fd = self._open_image(vm, disk.path, os.O_RDWR)
                fmt = disk.format or image_format(fd)
                if fmt == "qcow2" and qcow2_backing_file(fd):
                    raise VmError(f"{vm.name}: disk {disk.path}: qcow2 images with a backing "
                                  "file are not supported")
                ro_fd = self._open_image(vm, disk.path, os.O_RDONLY)
                disks.append(DriveBackend((fd, ro_fd), i + 1, fmt))
            if vm.conf.cdrom is not None:
                fd = self._open_image(vm, vm.conf.cdrom, os.O_RDONLY)
                cdrom = DriveBackend((fd,), MAX_DISKS + 1, image_format(fd), readonly=True)
        except BaseException:
            self._close_fds(vm)
            raise
        return disks, cdrom

    @staticmethod
    def _open_image(vm: VmRun, path: str, mode: int) -> int:
        try:
            fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise VmError(f"{vm.name}: {path}: {exc.strerror}", exc.errno or 5) from None
        vm.fds.append(fd)
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise VmError(f"{vm.name}: {path}: not a regular file or block device")
        return fd

    @staticmethod
    def _close_fds(vm: VmRun) -> None:
        for fd in vm.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        vm.fds = []

    async def _connect_qmp(self, vm: VmRun, path: Path) -> QmpClient:
        assert self._nursery is not None
        with trio.fail_after(30):
            while not path.exists():
                if vm.proc is not None and vm.proc.poll() is not None:
                    raise VmError(f"{vm.name}: QEMU exited with {vm.proc.returncode}", 5)
                await trio.sleep(0.02)
        ready: trio.Event = trio.Event()
        holder: list[QmpClient] = []

        async def keep(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with qmp_connect(path) as client:
                holder.append(client)
                ready.set()
                task_status.started()
                async for event in client.events:
                    if event.get("event") == "SHUTDOWN":
                        vm.shutdown_reason = str(event.get("data", {}).get("reason", ""))

        try:
            await self._nursery.start(keep)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError, EOFError, QmpError) as exc:
            # QEMU refused its command line and exited; its stderr is in the log.
            raise VmError(f"{vm.name}: QEMU failed to start ({exc})", 5) from None
        await ready.wait()
        return holder[0]

    async def _pin_vcpus(self, vm: VmRun, qmp: QmpClient) -> None:
        """Put the vCPU threads on the VM's home CPU (parent/placement.py)."""
        if vm.placement is None:
            return
        try:
            tids = vcpu_thread_ids(await qmp.execute("query-cpus-fast"))
        except QmpError as exc:
            log.warning("%s: no vCPU thread ids (%s): vCPUs not pinned", vm.name, exc)
            return
        pinned = pin_threads(tids, vm.placement.vcpus)
        log.info("%s: vCPU threads %s on CPU %s (%d pinned), vionet on CPU %s", vm.name, tids,
                 sorted(vm.placement.vcpus), pinned, sorted(vm.placement.devices))

    async def _find_pty(self, qmp: QmpClient) -> str | None:
        for dev in await qmp.execute("query-chardev"):
            if dev.get("label") == "ser0" and str(dev.get("filename", "")).startswith("pty:"):
                return str(dev["filename"])[4:]
        return None

    # --- running ----------------------------------------------------------------------------

    async def _monitor(self, vm: VmRun) -> None:
        assert vm.proc is not None
        await wait_process(vm.proc)
        rc = vm.proc.returncode
        reboot = await self._was_reboot(vm)
        log.info("%s: QEMU exited with %s (%s)", vm.name, rc, vm.shutdown_reason or "killed")
        vm.exited.set()
        await self._cleanup(vm)
        vm.state = State.STOPPED
        if reboot and not vm.stop_requested:
            log.info("%s: guest rebooted; restarting", vm.name)
            try:
                await self.start(vm.name, vm.conf)
            except VmError as exc:
                log.error("%s: restart failed: %s", vm.name, exc)

    async def _was_reboot(self, vm: VmRun) -> bool:
        # With -no-reboot a guest reboot is a SHUTDOWN event with reason guest-reset; give the
        # QMP reader a moment to see the event that raced the process exit.
        with trio.move_on_after(1):
            while vm.shutdown_reason is None and vm.qmp is not None and not vm.qmp.closed:
                await trio.sleep(0.02)
        return vm.shutdown_reason == "guest-reset"

    async def _cleanup(self, vm: VmRun) -> None:
        self._close_fds(vm)
        for nic in vm.nics:
            await self.parent.remove_nic(nic.spec.name)
            self._taps_in_use.discard(nic.spec.tap)
        vm.nics = []
        vm.qmp = None
        vm.tty = None
        if vm.rundir is not None:
            shutil.rmtree(vm.rundir, ignore_errors=True)

    # --- stop / pause -----------------------------------------------------------------------

    async def stop(self, name: str, *, force: bool = False, wait: bool = False) -> None:
        vm = self.get(name)
        if vm.proc is None or vm.proc.returncode is not None or vm.state is State.STOPPED:
            raise VmError(f"{name}: VM is not running", 3)  # ESRCH
        vm.stop_requested = True
        if force:
            vm.state = State.STOPPING
            await self._kill(vm)
        else:
            vm.state = State.STOPPING
            if vm.qmp is not None:
                try:
                    await vm.qmp.execute("system_powerdown")
                except QmpError as exc:
                    raise VmError(f"{name}: {exc}") from exc
        if wait:
            await vm.exited.wait()

    async def _kill(self, vm: VmRun) -> None:
        proc = vm.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(FORCE_STOP_GRACE):
            await wait_process(proc)
        if proc.returncode is None:
            proc.kill()
            await wait_process(proc)

    async def pause(self, name: str, paused: bool) -> None:
        vm = self.get(name)
        want = State.RUNNING if paused else State.PAUSED
        if vm.state is not want or vm.qmp is None:
            raise VmError(f"{name}: VM is {vm.state.value}", 22)
        await vm.qmp.execute("stop" if paused else "cont")
        for nic in vm.nics:
            with contextlib.suppress(RuntimeError, trio.TooSlowError):
                await self.parent.request(
                    nic.spec.name, Imsg(MsgType.PAUSE if paused else MsgType.RESUME, {})
                )
        vm.state = State.PAUSED if paused else State.RUNNING

    async def wait(self, name: str) -> None:
        vm = self.get(name)
        if vm.state is State.STOPPED:
            raise VmError(f"{name}: VM is not running", 3)
        await vm.exited.wait()
