"""Host-side measurements: iperf3, ping, process CPU time and start time, from /proc."""

from __future__ import annotations

import os
import re
import select
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench.console import GuestConsole
from bench.iperf_client import run_iperf3

CLK_TCK = os.sysconf("SC_CLK_TCK")
_RTT = re.compile(r"time=([\d.]+) ms")
_STAMP = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from", re.M)


class MeasureError(RuntimeError):
    pass


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads) so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each watched process (role -> pid)."""
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def start_epoch(pid: int) -> float:
    """When process pid started, as a Unix time (its start is kept in ticks since boot)."""
    started = int(_stat_fields(pid)[19]) / CLK_TCK
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    return time.time() - age


class Pinger:
    """Pings target every 50 ms from now until it first answers (boot-to-network time)."""

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        # Neither -c nor -w: ping ends both at the first "unreachable" error then. It runs
        # until stopped. -D stamps each line with Unix time; stdbuf makes ping write each line
        # as it happens.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "ping", "-D", "-n", "-i", "0.05", "-W", "1", target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def wait(self) -> float:
        """The Unix time of the first reply."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + self.timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                buf += data
                m = _STAMP.search(buf.decode(errors="replace"))
                if m is not None:
                    return float(m.group(1))
        finally:
            self.stop()
        tail = buf[-500:].decode(errors="replace")
        raise MeasureError(f"{self.target} never answered ping in {self.timeout}s: {tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _median_rtt(output: str, count: int, what: str) -> float:
    """Median of the per-reply times (iputils and busybox both print "time=X ms").

    The median, not the average: under TCG one late reply (the guest busy elsewhere) would
    otherwise dominate 20 samples.
    """
    times = [float(t) for t in _RTT.findall(output)]
    if len(times) < count // 2:
        raise MeasureError(f"{what}: {len(times)} of {count} replies:\n{output[-1500:]}")
    return statistics.median(times)


def host_ping_ms(target: str, count: int = 20) -> float:
    """Median RTT of pings from the host (the bench's netns) to target."""
    res = subprocess.run(["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "2", target],
                         capture_output=True, text=True, timeout=count + 30)
    return _median_rtt(res.stdout + res.stderr, count, f"host ping {target}")


def guest_ping_ms(con: GuestConsole, target: str, count: int = 20) -> float:
    """Median RTT of pings from the guest (busybox ping over its console) to target."""
    out = con.run(f"ping -c {count} -i 0.2 {target}", timeout=count + 60, check=False)
    return _median_rtt(out, count, f"guest ping {target}")


@dataclass(frozen=True)
class Transfer:
    """One iperf3 test and the CPU the watched processes spent meanwhile."""

    gbps: float
    bytes: int
    cpu: dict[str, float]  # role ("vionet", "qemu") -> CPU seconds during the test
    # TCP retransmissions of the sending side; None when the sender did not report them.
    retransmits: int | None = None


def sender_retransmits(end: dict[str, Any]) -> int | None:
    """The sender's retransmission count from iperf3 -J's "end" section.

    "sum_sent" is the sender's summary in both directions: with -R the server (the guest)
    sends, and the client gets its count in the end-of-test exchange. iperf3 leaves the key
    out, or reports -1, when the sender's kernel gives no TCP_INFO.
    """
    value = end.get("sum_sent", {}).get("retransmits")
    if not isinstance(value, int) or value < 0:
        return None
    return value


def iperf3(server: str, seconds: int, reverse: bool, pids: dict[str, int]) -> Transfer:
    """Host-side iperf3 client against the guest's server; reverse means guest -> host."""
    before = cpu_now(pids)
    data = run_iperf3(server, seconds, reverse)
    after = cpu_now(pids)
    received = data["end"]["sum_received"]
    return Transfer(gbps=float(received["bits_per_second"]) / 1e9,
                    bytes=int(received["bytes"]),
                    cpu={role: after[role] - before[role] for role in pids},
                    retransmits=sender_retransmits(data["end"]))
