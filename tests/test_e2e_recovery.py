"""Crash recovery: a killed vionet worker, a killed QEMU, dying control clients, many restarts.

The parent keeps each NIC's tap and vhost-user listening socket across worker restarts and QEMU
(reconnect-ms) reconnects to the new worker, so a guest survives its NIC's worker dying; a QEMU
that dies takes its NICs with it. Neither may leak fds or memory in the daemon.

KILL_CYCLES (environment VMD_KILL_CYCLES, default 20) sets how many worker kills the leak test
does; the parent's restart backoff (up to 5 s after a burst) makes a cycle ~6 s, so the full
100 run in ``make soak`` rather than ``make test``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from bench.console import GuestConsole
from bench.iperf_client import run_iperf3
from imsg.catalogue import MsgType
from imsg.codec import Imsg, encode
from parent.tap import Tap
from tests.recovery_procs import alive, control_pid, fd_count, rss_kb
from tests.test_e2e_guest import host_address
from tests.vmd_harness import RUN_DIR, Vmd, wait_for

pytestmark = pytest.mark.e2e

HOST = "10.77.0.1"
KILL_CYCLES = int(os.environ.get("VMD_KILL_CYCLES", "20"))
LEAK_FIRST = 5  # the leak baseline: after this many cycles (lazy imports, caches are warm)
GUEST_ERRORS = re.compile(r"NETDEV WATCHDOG|BUG|Oops|not a head")


def vm_block(name: str, index: int) -> str:
    ip = f"10.77.0.{index + 2}"
    return f"""
vm "{name}" {{
	memory 256M
	cmdline "console=ttyS0 quiet panic=-1 ip={ip}::{HOST}:255.255.255.0::eth0:off"
	interface {{
		switch "sw"
		lladdr fe:e1:ba:d0:01:{index + 2:02x}
		offload all
	}}
}}
"""


def conf(*names: str) -> str:
    """A switch on vmdbr0 and one VM per name; VM i is 10.77.0.(i+2)."""
    return 'switch "sw" {\n\tinterface vmdbr0\n}\n' + "".join(
        vm_block(n, i) for i, n in enumerate(names)
    )


def nic0(vmd: Vmd, name: str) -> dict[str, Any]:
    nic: dict[str, Any] = vmd.status(name)["nics"][0]
    return nic


def ping_ok(con: GuestConsole, target: str = HOST) -> bool:
    return "1 packets received" in con.run(f"ping -c 1 -W 2 {target}", check=False)


class OffloadWatch:
    """Samples a tap's offload mask (ethtool, read back from the kernel) in a thread."""

    def __init__(self, tap: str) -> None:
        self.tap = Tap(tap, -1)
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.seen.append(self.tap.read_offload())
            time.sleep(0.01)

    def __enter__(self) -> OffloadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Background:
    """Run a callable in a thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the test thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("background task did not finish")
        if self._error is not None:
            raise self._error
        return self._value


def bytes_after(result: dict[str, Any], offset: float) -> list[int]:
    """Bytes of each whole 1 s interval from ``offset`` on (iperf3 may end with a sliver)."""
    return [int(iv["sum"]["bytes"]) for iv in result["intervals"]
            if float(iv["sum"]["start"]) >= offset and float(iv["sum"]["seconds"]) >= 0.5]


# --- 1: a worker killed under load ------------------------------------------------------------


def test_worker_killed_mid_iperf_is_replaced_and_traffic_resumes(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    name = "rk"
    with Vmd(tmp_path, conf(name)) as vmd:
        con = vmd.wait_ready(name)
        host_address()
        before = vmd.status(name)
        nic = before["nics"][0]
        qemu_pid, old_worker = before["pid"], nic["vionet_pid"]
        negotiated = set(nic["tap_offload"])
        assert {"CSUM", "TSO4"} <= negotiated, nic
        applied_before = nic["parent_counters"].get("tunscap_applied", 0)

        t0 = time.monotonic()
        run = Background(run_iperf3, "10.77.0.2", seconds=15, extra=("-i", "1"))
        time.sleep(4)
        with OffloadWatch(nic["tap"]) as watch:
            kill_at = time.monotonic() - t0
            os.kill(old_worker, signal.SIGKILL)
            new = wait_for(lambda: (n := nic0(vmd, name))["vionet_pid"] not in (None, old_worker)
                           and set(n["tap_offload"]) == negotiated and n, 30,
                           "a new worker with the offloads renegotiated")
        result = run.result(60)

        assert not alive(old_worker)
        assert vmd.status(name)["pid"] == qemu_pid, "the guest was restarted"
        # The parent reset the tap to 0 when the worker died; the guest's renegotiation with the
        # new worker brought back exactly the mask negotiated at boot.
        assert 0 in watch.seen, watch.seen[:50]
        assert set(new["tap_offload"]) == negotiated
        assert set(new["features_acked"]) == set(nic["features_acked"])
        assert new["parent_counters"]["tunscap_applied"] > applied_before
        # Traffic resumed within the same TCP connection: the last seconds moved data.
        after = bytes_after(result, kill_at + 1)
        print(f"kill at {kill_at:.1f}s; bytes per second after it: {after}")
        assert len(after) >= 5, result["intervals"]
        assert sum(after) > 10_000_000 and all(b > 0 for b in after[-3:]), after
        second = run_iperf3("10.77.0.2", seconds=3)
        assert second["end"]["sum_received"]["bytes"] > 10_000_000
        assert ping_ok(con)
        assert not GUEST_ERRORS.search(vmd.console_log(name)), vmd.console_log(name)


# --- 2: QEMU killed ---------------------------------------------------------------------------


def test_qemu_crash_is_cleaned_up_and_the_vm_starts_again(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    name = "qc"
    with Vmd(tmp_path, conf(name)) as vmd:
        vmd.wait_ready(name)
        assert vmd.proc is not None
        st = vmd.status(name)
        qemu_pid, worker, tap = st["pid"], st["nics"][0]["vionet_pid"], st["nics"][0]["tap"]
        rundir = RUN_DIR / str(vmd.proc.pid) / name
        assert rundir.is_dir()
        with IPRoute() as ipr:
            assert ipr.link_lookup(ifname=tap)

        os.kill(qemu_pid, signal.SIGKILL)
        wait_for(lambda: vmd.status(name)["state"] == "stopped", 30, "the VM to be stopped")

        stopped = vmd.status(name)
        assert stopped["pid"] == 0 and stopped["nics"] == []
        assert not alive(qemu_pid) and not alive(worker)
        with IPRoute() as ipr:
            assert ipr.link_lookup(ifname=tap) == [], f"tap {tap} left behind"
        assert not rundir.exists()

        vmd.vmctl("start", name)
        con = vmd.wait_ready(name)
        again = vmd.status(name)
        assert again["pid"] != qemu_pid and again["nics"][0]["vionet_pid"] not in (None, worker)
        host_address_once()
        assert ping_ok(con)


def host_address_once() -> None:
    # The bridge outlives the VM, and with it the host's address on it.
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="vmdbr0")[0]
        if not ipr.get_addr(index=idx, address=HOST):
            host_address()


# --- 3: control clients dying mid-request -----------------------------------------------------


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    return sock


@pytest.mark.hostile
def test_control_clients_dying_mid_request_leave_the_daemon_healthy(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    name = "cc"
    with Vmd(tmp_path, conf(name)) as vmd:
        vmd.wait_ready(name)
        assert vmd.proc is not None
        parent = vmd.proc.pid
        control = control_pid(parent)
        vmd.status(name)
        base = {parent: fd_count(parent), control: fd_count(control)}
        request = encode(Imsg(MsgType.CTL_STATUS, {"name": name}))

        for _ in range(20):
            with _connect(vmd.socket) as s:  # half a request, then gone
                s.send(request[: len(request) // 2])
            with _connect(vmd.socket) as s:  # a header only
                s.send(request[:16])
            with _connect(vmd.socket) as s:  # a whole request, the answer never read
                s.send(request)
            with _connect(vmd.socket) as s:  # a reset (SO_LINGER 0) right after the request
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                s.send(request)
            _connect(vmd.socket).close()  # connect, nothing else
        # vmctl wait blocks until the VM stops; kill it while it waits.
        waiters = []
        for _ in range(3):
            waiters.append(subprocess.Popen(
                [sys.executable, "-m", "vmd_py.vmctl", "-s", vmd.socket, "wait", name],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: fd_count(control) >= base[control] + 3, 30, "the waits to arrive")
        for w in waiters:
            w.kill()
            w.wait()

        assert vmd.status(name)["state"] == "running"
        assert control_pid(parent) == control, "the control process was restarted or died"
        assert vmd.proc.poll() is None
        wait_for(lambda: fd_count(parent) == base[parent], 10, "the parent's fds to settle")
        # The abandoned waits end with the VM: their sockets must not outlive it.
        vmd.vmctl("stop", "-w", name)
        wait_for(lambda: fd_count(control) == base[control], 10,
                 f"the control's fds back to {base[control]} (now {fd_count(control)})")
        assert vmd.status(name)["state"] == "stopped"
        assert control_pid(parent) == control


# --- 4: leaks across many worker restarts -----------------------------------------------------


@pytest.mark.timeout(max(600, KILL_CYCLES * 15))
def test_no_fd_or_memory_leak_across_worker_kills(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    name = "lk"
    with Vmd(tmp_path, conf(name)) as vmd:
        con = vmd.wait_ready(name)
        host_address()
        assert vmd.proc is not None
        parent = vmd.proc.pid
        first = vmd.status(name)
        qemu_pid = first["pid"]
        negotiated = set(first["nics"][0]["tap_offload"])
        acked = set(first["nics"][0]["features_acked"])
        samples: dict[int, tuple[int, int]] = {}
        t0 = time.monotonic()
        for cycle in range(1, KILL_CYCLES + 1):
            old = nic0(vmd, name)["vionet_pid"]
            os.kill(old, signal.SIGKILL)
            wait_for(lambda old=old: (n := nic0(vmd, name))["vionet_pid"] not in (None, old)
                     and set(n["features_acked"]) == acked
                     and set(n["tap_offload"]) == negotiated, 30,
                     f"cycle {cycle}: the new worker up and negotiated", interval=0.2)
            wait_for(lambda: ping_ok(con), 20, f"cycle {cycle}: the guest's link")
            if cycle in (LEAK_FIRST, KILL_CYCLES):
                samples[cycle] = (fd_count(parent), rss_kb(parent))
        elapsed = time.monotonic() - t0
        (fd5, rss5), (fdn, rssn) = samples[LEAK_FIRST], samples[KILL_CYCLES]
        print(f"{KILL_CYCLES} worker kills in {elapsed:.0f}s; parent fds {fd5} -> {fdn}, "
              f"RSS {rss5} kB -> {rssn} kB ({(rssn - rss5) / rss5:+.1%})")
        assert vmd.status(name)["pid"] == qemu_pid
        assert fdn == fd5
        assert rssn < rss5 * 1.10


# --- 6: one VM's broken NIC leaves another VM's NIC alone -------------------------------------


@pytest.mark.hostile
def test_killing_one_vms_workers_leaves_the_other_vm_unaffected(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    with Vmd(tmp_path, conf("good", "bad")) as vmd:
        good = vmd.wait_ready("good")
        vmd.wait_ready("bad")
        host_address()
        g0 = vmd.status("good")
        good_worker = g0["nics"][0]["vionet_pid"]
        c0 = g0["nics"][0]["counters"]

        run = Background(run_iperf3, "10.77.0.2", seconds=15, extra=("-i", "1"))
        time.sleep(1)
        killed: set[int] = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = nic0(vmd, "bad")["vionet_pid"]
            if pid is not None and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(1.5)
        vmd.vmctl("stop", "-f", "bad")
        result = run.result(60)

        per_second = [iv["sum"]["bits_per_second"] for iv in result["intervals"]]
        median = sorted(per_second)[len(per_second) // 2]
        print(f"killed the other VM's worker {len(killed)} times; good's Gbit/s per second: "
              f"{[round(b / 1e9, 2) for b in per_second]}")
        assert len(killed) >= 4
        assert len(per_second) >= 14 and min(per_second) > median / 10, per_second
        g1 = vmd.status("good")
        assert g1["pid"] == g0["pid"] and g1["nics"][0]["vionet_pid"] == good_worker
        c1 = g1["nics"][0]["counters"]
        assert c1["rx_packets"] > c0["rx_packets"] + 1000
        assert c1["tx_packets"] > c0["tx_packets"] + 1000
        assert ping_ok(good)
        wait_for(lambda: vmd.status("bad")["state"] == "stopped", 30, "bad stopped")


def test_a_killed_control_process_is_replaced(in_netns: str, tmp_path: Path,
                                              qemu_binary: str) -> None:
    """vmctl keeps working after the control process dies (the parent starts a new one)."""
    name = "ctlrestart"
    with Vmd(tmp_path, conf(name)) as vmd:
        assert vmd.proc is not None
        daemon = vmd.proc.pid
        old = control_pid(daemon)
        os.kill(old, signal.SIGKILL)

        def replaced() -> int | None:
            try:
                pid = control_pid(daemon)
            except AssertionError:  # between the old one's exit and the new one's start
                return None
            return pid if pid != old else None

        new = wait_for(replaced, 30, "a new control process")
        wait_for(lambda: vmd.vmctl("status", check=False).returncode == 0, 30, "vmctl to work")
        assert name in vmd.vmctl("status").stdout
        assert new != old and not alive(old)
