"""Drive a real vmd daemon (and its real QEMU guests) from tests, inside a test netns.

The test process must already be inside a network namespace of its own (the ``in_netns``
fixture): vmd, its bridges and taps, and every host-side iperf3 inherit it, so no packet leaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.console import GuestConsole

RUN_DIR = Path("/run/vmd-py")
READY = "vmd-guest: ready"


class HarnessError(AssertionError):
    pass


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Vmd:
    def __init__(self, workdir: Path, conf: str) -> None:
        self.workdir = workdir
        self.conf = workdir / "vm.conf"
        self.conf.write_text(conf)
        self.socket = str(workdir / "vmd.sock")
        self.log = workdir / "vmd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.consoles: list[GuestConsole] = []

    def start(self) -> Vmd:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmd_py.vmd", "-d", "-f", str(self.conf),
                 "-s", self.socket],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None,
                 30, "the control socket")
        if self.proc.poll() is not None:
            raise HarnessError(f"vmd exited: {self.log.read_text()}")
        return self

    def vmctl(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "vmd_py.vmctl", "-s", self.socket, *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and res.returncode != 0:
            raise HarnessError(f"vmctl {' '.join(args)}: {res.returncode} {res.stderr}")
        return res

    def status(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.vmctl("status", "--json", name).stdout)
        return data

    def console_log(self, name: str) -> str:
        assert self.proc is not None
        path = RUN_DIR / str(self.proc.pid) / name / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, name: str, timeout: float = 90) -> GuestConsole:
        # Running first: only then is console.log this boot's (the daemon recreates the dir).
        wait_for(lambda: self.status(name)["state"] == "running", timeout, f"{name} to start")
        wait_for(lambda: READY in self.console_log(name), timeout, f"{name} to boot")
        tty_path = self.status(name)["tty"]
        con = GuestConsole.open_pty(tty_path)
        self.consoles.append(con)
        con.run("true", timeout=30)  # the shell answers
        return con

    def stop(self) -> None:
        for con in self.consoles:
            with contextlib.suppress(OSError):
                con.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Vmd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gbps(result: dict[str, Any]) -> float:
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def retransmits(result: dict[str, Any]) -> int:
    return int(result["end"]["sum_sent"].get("retransmits", 0))
