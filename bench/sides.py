"""The two things compared, each booting the same guest in the caller's network namespace.

vmd: the real daemon (vmd_py.vmd) with its vionet worker, QEMU talking vhost-user to it.
qemu: QEMU alone with its built-in virtio-net on a tap (vhost=off), the reference.
Both boot the same kernel, initrd and command line with the same memory, vCPUs and MAC.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pyroute2 import IPRoute, netns

from bench.console import GuestConsole
from bench.measure import Pinger, start_epoch
from parent.bridge import attach, ensure_bridge
from vmd_py.guest_image import GuestImage
from vmd_py.qemu import NicBackend, QemuVm, Serial, build_argv

HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"
BRIDGE = "vmdbr0"
MAC = "fe:e1:ba:d0:00:02"
MEMORY_MB = 256
CMDLINE = f"console=ttyS0 quiet panic=-1 ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
READY = b"vmd-guest: ready"
VM_NAME = "bench"
RUN_DIR = Path("/run/vmd-py")
REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 180.0
Offload = Literal["all", "csum", "none"]


class SideError(RuntimeError):
    pass


@dataclass
class Booted:
    """A guest with working network: its console, the processes to watch, how long it took."""

    console: GuestConsole
    pids: dict[str, int]  # "qemu", and "vionet" on the vmd side
    boot_s: float
    info: dict[str, Any] = field(default_factory=dict)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SideError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


@contextmanager
def fresh_netns(prefix: str = "vmdbench") -> Iterator[str]:
    """Create a namespace and move this process's main thread into it meanwhile.

    Children started from the main thread inherit it (setns is per thread), so every tap,
    bridge, QEMU, daemon, ping and iperf3 of a run lives there, and goes with it.
    """
    name = f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    netns.create(name)
    try:
        netns.pushns(name)
        try:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            yield name
        finally:
            netns.popns()
    finally:
        netns.remove(name)


def _link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def _host_address() -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.addr("add", index=idx, address=HOST_IP, prefixlen=24)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- vmd ------------------------------------------------------------------------------------

def vmd_conf(offload: Offload, poll: str | None = None) -> str:
    # poll: vm.conf's busy-poll window for the NIC (e.g. "1s"); None keeps vionet's default.
    poll_opt = f", poll {poll}" if poll else ""
    return f"""switch "sw" {{
	interface {BRIDGE}
}}
vm "{VM_NAME}" {{
	memory {MEMORY_MB}M
	cmdline "{CMDLINE}"
	interface {{
		switch "sw"
		lladdr {MAC}
		offload {offload}{poll_opt}
	}}
}}
"""


class _Vmd:
    def __init__(self, workdir: Path, offload: Offload, poll: str | None) -> None:
        self.conf = workdir / "vm.conf"
        self.conf.write_text(vmd_conf(offload, poll))
        self.socket = workdir / "vmd.sock"
        self.log = workdir / "vmd.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmd_py.vmd", "-d", "-f", str(self.conf),
                 "-s", str(self.socket)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SideError(f"vmd exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")

    def status(self) -> dict[str, Any]:
        res = subprocess.run(
            [sys.executable, "-m", "vmd_py.vmctl", "-s", str(self.socket), "status", "--json",
             VM_NAME], capture_output=True, text=True, timeout=60, cwd=REPO)
        if res.returncode != 0:
            raise SideError(f"vmctl status: {res.returncode} {res.stderr}")
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def console_log(self) -> str:
        # The run directory is per daemon pid in newer versions, per VM name in older ones.
        for path in (RUN_DIR / str(self.proc.pid) / VM_NAME / "console.log",
                     RUN_DIR / VM_NAME / "console.log"):
            if path.exists():
                return path.read_text(errors="replace")
        return ""


@contextmanager
def vmd_guest(workdir: Path, offload: Offload = "all",
              poll: str | None = None) -> Iterator[Booted]:
    """The daemon starts the guest (autostart from vm.conf); yields it with network up."""
    with contextlib.ExitStack() as cleanup:
        # Callbacks run last-in first-out, each even if an earlier one raised.
        vmd = _Vmd(workdir, offload, poll)
        cleanup.callback(_stop, vmd.proc, 60)

        def bridge_ready() -> bool:
            vmd.check_alive()
            return _link_exists(BRIDGE)
        wait_for(bridge_ready, 60, f"vmd to create {BRIDGE}")
        _host_address()
        pinger = Pinger(GUEST_IP, BOOT_TIMEOUT)
        cleanup.callback(pinger.stop)
        wait_for(vmd.socket.exists, 60, "the control socket")

        def running() -> dict[str, Any] | None:
            vmd.check_alive()
            st = vmd.status()
            return st if st["state"] == "running" and st["pid"] else None
        status = wait_for(running, BOOT_TIMEOUT, "the VM to run")
        qemu_pid = int(status["pid"])
        started = start_epoch(qemu_pid)
        boot_s = pinger.wait() - started
        wait_for(lambda: READY.decode() in vmd.console_log(), BOOT_TIMEOUT, "the ready line")
        con = GuestConsole.open_pty(vmd.status()["tty"])
        cleanup.callback(con.close)
        con.run("true", timeout=30)
        nic = vmd.status()["nics"][0]
        if not nic.get("vionet_pid"):
            raise SideError(f"no vionet worker in status: {nic}")
        yield Booted(con, {"qemu": qemu_pid, "vionet": int(nic["vionet_pid"])}, boot_s,
                     {"features_acked": nic.get("features_acked"),
                      "tap_offload": nic.get("tap_offload")})


# --- QEMU with its own virtio-net on a tap ---------------------------------------------------

TAP = "tapq0"


def _tap_on_bridge() -> None:
    ensure_bridge(BRIDGE)
    with IPRoute() as ipr:
        # Persistent, so it can join the bridge before QEMU attaches to it by name.
        ipr.link("add", ifname=TAP, kind="tuntap", mode="tap")
    attach(TAP, BRIDGE)
    _host_address()


@contextmanager
def qemu_guest(workdir: Path, image: GuestImage,
               accel: Literal["kvm", "tcg"]) -> Iterator[Booted]:
    _tap_on_bridge()
    sock_path = workdir / "console.sock"
    vm = QemuVm(
        name=VM_NAME, memory_mb=MEMORY_MB, vcpus=1, kernel=image.kernel, initrd=image.initrd,
        cmdline=CMDLINE, accel=accel, qmp_path=workdir / "qmp.sock",
        serial=Serial("socket", path=sock_path, logfile=workdir / "console.log"),
        nics=[NicBackend("tap", MAC, ifname=TAP)],
    )
    log = workdir / "qemu.log"
    with contextlib.ExitStack() as cleanup:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cleanup.callback(listener.close)
        listener.bind(str(sock_path))
        listener.listen(1)
        pinger = Pinger(GUEST_IP, BOOT_TIMEOUT)
        cleanup.callback(pinger.stop)
        with log.open("wb") as out:
            proc = subprocess.Popen(build_argv(vm), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        cleanup.callback(_stop, proc, 20)
        started = start_epoch(proc.pid)
        listener.settimeout(30)
        try:
            conn, _ = listener.accept()
        except TimeoutError as exc:
            raise SideError(f"QEMU never connected its serial: {log.read_text()}") from exc
        con = GuestConsole(conn.detach())
        cleanup.callback(con.close)
        boot_s = pinger.wait() - started
        con.wait_for(READY, BOOT_TIMEOUT)
        con.run("true", timeout=30)
        yield Booted(con, {"qemu": proc.pid}, boot_s)
