"""Soak: iperf3 both ways through one guest while a second VM on its switch starts and stops.

The real daemon runs in a network namespace of its own (removed afterwards). Every period
(30 s) one iperf3 run, host->guest and guest->host in turn, goes to VM "soak"; meanwhile VM
"churn" on the same switch is started, booted, pinged and stopped again as often as fits. At the
end of each period, with iperf3 finished and "churn" stopped (so the daemon is in the same state
each time), the RSS and fd count of every vmd process are sampled: the parent, the control
process, and each VM's vionet worker and QEMU ("churn"'s are sampled while it is up, once per
period: each is a new process). At the end: per process, whether RSS and fds stayed within
5% of their value at minute 2 until the end ("flat").

    python -m bench.soak [--minutes 10] [--period 30]

Exit status 1 if a long-lived process (parent, control, soak's worker and QEMU) is not flat or
a run failed.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pyroute2 import IPRoute

from bench.iperf_client import run_iperf3
from tests import netns
from tests.recovery_procs import control_pid, fd_count, rss_kb
from tests.vmd_harness import READY, Vmd, wait_for
from vmd_py.guest_image import ensure_guest_image

HOST = "10.77.0.1"
SOAK_IP = "10.77.0.2"
CHURN_IP = "10.77.0.3"
FLAT = 0.05
FLAT_FROM_S = 120.0
# vmd refuses a third start within 6 s of the previous one in a row, measured from when it
# launched QEMU (a second after the request): 8 s between requests keeps clear of it.
START_SPACING = 8.0
LONG_LIVED = ("parent", "control", "soak.vionet", "soak.qemu")


def conf() -> str:
    def vm(name: str, ip: str, mac: str, extra: str) -> str:
        return f"""
vm "{name}" {{
{extra}	memory 256M
	cmdline "console=ttyS0 quiet panic=-1 ip={ip}::{HOST}:255.255.255.0::eth0:off"
	interface {{
		switch "sw"
		lladdr {mac}
	}}
}}
"""
    return ('switch "sw" {\n\tinterface vmdbr0\n}\n'
            + vm("soak", SOAK_IP, "fe:e1:ba:d0:02:02", "")
            + vm("churn", CHURN_IP, "fe:e1:ba:d0:02:03", "\tdisable\n"))


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Sample:
    t: float
    direction: str
    gbps: float
    churn_cycles: int
    procs: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # pid, RSS kB, fds


def measure(pid: int) -> tuple[int, int, int]:
    return pid, rss_kb(pid), fd_count(pid)


class Iperf:
    """One iperf3 run in a thread (the churn loop meanwhile runs in the caller's)."""

    def __init__(self, seconds: int, reverse: bool) -> None:
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(seconds, reverse), daemon=True)
        self._thread.start()

    def _run(self, seconds: int, reverse: bool) -> None:
        try:
            self.result = run_iperf3(SOAK_IP, seconds=seconds, reverse=reverse)
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def running(self) -> bool:
        return self._thread.is_alive()

    def gbps(self) -> float:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return float(self.result["end"]["sum_received"]["bits_per_second"]) / 1e9


class Churn:
    """Start, boot, ping and stop the second VM; remembers how long a cycle takes."""

    def __init__(self, vmd: Vmd) -> None:
        self.vmd = vmd
        self.cycles = 0
        self.last_start = -START_SPACING
        self.duration = 15.0
        self.procs: dict[str, tuple[int, int, int]] = {}

    def cycle(self, sample: bool) -> None:
        t0 = time.monotonic()
        time.sleep(max(0.0, self.last_start + START_SPACING - t0))
        self.last_start = time.monotonic()
        self.vmd.vmctl("start", "churn")
        wait_for(lambda: self.vmd.status("churn")["state"] == "running", 60, "churn running")
        wait_for(lambda: READY in self.vmd.console_log("churn"), 120, "churn booted")
        wait_for(lambda: subprocess.run(["ping", "-c", "1", "-W", "1", CHURN_IP],
                                        capture_output=True).returncode == 0,
                 30, "churn answering pings")
        if sample:
            st = self.vmd.status("churn")
            self.procs = {"churn.vionet": measure(st["nics"][0]["vionet_pid"]),
                          "churn.qemu": measure(st["pid"])}
        self.vmd.vmctl("stop", "-w", "churn")
        self.cycles += 1
        self.duration = time.monotonic() - t0


def host_address() -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="vmdbr0")[0]
        ipr.addr("add", index=idx, address=HOST, prefixlen=24)


def run_soak(workdir: Path, minutes: float, period: int) -> list[Sample]:
    samples: list[Sample] = []
    with Vmd(workdir, conf()) as vmd:
        assert vmd.proc is not None
        vmd.wait_ready("soak")
        host_address()
        parent = vmd.proc.pid
        control = control_pid(parent)
        churn = Churn(vmd)
        start = time.monotonic()
        periods = max(1, round(minutes * 60 / period))
        for k in range(periods):
            period_end = start + (k + 1) * period
            reverse = k % 2 == 1
            run = Iperf(max(5, int(period_end - time.monotonic()) - 2), reverse)
            cycles_before = churn.cycles
            while run.running() and time.monotonic() + churn.duration < period_end:
                churn.cycle(sample=churn.cycles == cycles_before)
            rate = run.gbps()
            st = vmd.status("soak")
            s = Sample(time.monotonic() - start, "g->h" if reverse else "h->g", rate,
                       churn.cycles - cycles_before)
            s.procs = {"parent": measure(parent), "control": measure(control),
                       "soak.vionet": measure(st["nics"][0]["vionet_pid"]),
                       "soak.qemu": measure(st["pid"]), **churn.procs}
            churn.procs = {}
            samples.append(s)
            log(f"t={s.t:.0f}s {s.direction} {rate:.2f} Gbit/s, {s.churn_cycles} churn cycles")
            time.sleep(max(0.0, period_end - time.monotonic()))
    return samples


def table(samples: list[Sample]) -> str:
    names = list(dict.fromkeys(n for s in samples for n in s.procs))
    head = f"{'t(s)':>5} {'iperf3':>6} {'Gbit/s':>6} {'churn':>5} " + " ".join(
        f"{n + ' RSS(MB)/fds':>24}" for n in names)
    lines = [head, "-" * len(head)]
    for s in samples:
        cells = []
        for n in names:
            if n in s.procs:
                pid, rss, fds = s.procs[n]
                cells.append(f"{f'{rss / 1024:.1f}/{fds} [{pid}]':>24}")
            else:
                cells.append(f"{'-':>24}")
        lines.append(f"{s.t:5.0f} {s.direction:>6} {s.gbps:6.2f} {s.churn_cycles:5d} "
                     + " ".join(cells))
    return "\n".join(lines)


def flatness(samples: list[Sample]) -> tuple[str, bool]:
    """One verdict line per process; the bool is whether every long-lived one is flat."""
    window = [s for s in samples if s.t >= FLAT_FROM_S - 5]
    lines = [f"flat = RSS and fds within {FLAT:.0%} of their value at minute "
             f"{FLAT_FROM_S / 60:.0f}, from then to the end ({len(window)} samples)"]
    ok = True
    names = list(dict.fromkeys(n for s in samples for n in s.procs))
    for n in names:
        vals = [s.procs[n] for s in window if n in s.procs]
        if len(vals) < 2:
            lines.append(f"  {n:13} n/a: fewer than 2 samples from minute 2 on")
            if n in LONG_LIVED:
                ok = False
            continue
        pids = {v[0] for v in vals}
        rss_ref, fd_ref = vals[0][1], vals[0][2]
        rss_dev = max(abs(v[1] - rss_ref) for v in vals) / rss_ref
        fd_dev = max(abs(v[2] - fd_ref) for v in vals) / fd_ref
        flat = rss_dev <= FLAT and fd_dev <= FLAT
        note = "" if len(pids) == 1 else f" (a new process each sample: {len(pids)} pids)"
        if n in LONG_LIVED and len(pids) != 1:
            flat = False
            note = f" (restarted: {sorted(pids)})"
        lines.append(f"  {n:13} {'FLAT' if flat else 'NOT FLAT':8} RSS max dev {rss_dev:+.1%}"
                     f" ({rss_ref} kB at ref), fds max dev {fd_dev:+.1%} ({fd_ref} at ref)"
                     f"{note}")
        if n in LONG_LIVED and not flat:
            ok = False
    return "\n".join(lines), ok


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the daemon's and the netns's clean-up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.soak", description="vmd soak: iperf3 + VM churn")
    p.add_argument("--minutes", type=float, default=10.0, help="total run time (default 10)")
    p.add_argument("--period", type=int, default=30,
                   help="seconds per iperf3 run and between samples (default 30)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    ensure_guest_image()
    log(f"{args.minutes} min, a sample every {args.period} s")
    with tempfile.TemporaryDirectory(prefix="vmd-soak-") as tmp, netns.entered("vmdsoak"):
        try:
            samples = run_soak(Path(tmp), args.minutes, args.period)
        except BaseException:
            log(f"failed; daemon log:\n{(Path(tmp) / 'vmd.log').read_text()[-4000:]}")
            raise
    print(table(samples))
    verdict, ok = flatness(samples)
    print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
