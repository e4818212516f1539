"""make demo: boot the default guest from examples/vm.conf inside a network namespace of its own,
show its console coming up, ping and iperf3 between guest and host, print `vmctl status -v`,
and stop everything cleanly. Every packet stays inside the namespace, which is deleted at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyroute2 import IPRoute, netns

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "vm.conf"
VM = "demo"
GUEST = "10.77.0.2"
HOST = "10.77.0.1"
RUN_DIR = Path("/run/vmd-py")


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(argv), flush=True)
    res = subprocess.run(argv, text=True, capture_output=True)
    print(res.stdout + res.stderr, end="", flush=True)
    if check and res.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} failed with {res.returncode}")
    return res


def vmctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "vmd_py.vmctl", "-s", sock, *args)


def follow_console(console: Path, deadline: float) -> None:
    shown = 0
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        if len(text) > shown:
            print(text[shown:], end="", flush=True)
            shown = len(text)
        if "vmd-guest: ready" in text:
            print(flush=True)
            return
        time.sleep(0.2)
    raise SystemExit("demo: the guest did not come up in time")


def main() -> int:
    name = f"vmd-demo-{os.getpid()}"
    netns.create(name)
    vmd: subprocess.Popen[bytes] | None = None
    try:
        netns.pushns(name)
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with tempfile.TemporaryDirectory() as tmp:
            sock = f"{tmp}/vmd.sock"
            step(f"vmd -d -f {CONF.relative_to(ROOT)} (in network namespace {name})")
            vmd = subprocess.Popen([sys.executable, "-m", "vmd_py.vmd", "-d", "-f", str(CONF),
                                    "-s", sock])
            start = time.monotonic()
            while not os.path.exists(sock):
                if vmd.poll() is not None or time.monotonic() - start > 60:
                    raise SystemExit("demo: vmd did not start")
                time.sleep(0.1)
            while b"running" not in subprocess.run(
                [sys.executable, "-m", "vmd_py.vmctl", "-s", sock, "status", VM],
                capture_output=True,
            ).stdout:
                if vmd.poll() is not None or time.monotonic() - start > 120:
                    raise SystemExit("demo: the VM did not start")
                time.sleep(0.2)
            step("the guest's console")
            follow_console(RUN_DIR / str(vmd.pid) / VM / "console.log", time.monotonic() + 120)
            print(f"(booted in {time.monotonic() - start:.1f} s)")
            with IPRoute() as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname="vmdbr0")[0], address=HOST,
                         prefixlen=24)
            step("ping the guest from the host")
            run("ping", "-c", "3", GUEST)
            step("iperf3 host -> guest, then guest -> host")
            for extra in ([], ["-R"]):
                for _ in range(20):
                    res = run("iperf3", "-c", GUEST, "-t", "5", *extra, check=False)
                    if res.returncode == 0:
                        break
                    time.sleep(0.5)
            step("vmctl status -v (offloads negotiated)")
            vmctl(sock, "status", "-v")
            step("vmctl stop -w demo")
            vmctl(sock, "stop", "-w", VM)
            vmctl(sock, "status")
            vmd.send_signal(signal.SIGTERM)
            vmd.wait(30)
            step(f"done: vmd exited with {vmd.returncode}")
    finally:
        if vmd is not None and vmd.poll() is None:
            vmd.send_signal(signal.SIGTERM)  # vmd stops its VMs and workers on SIGTERM
            try:
                vmd.wait(30)
            except subprocess.TimeoutExpired:
                vmd.kill()
                vmd.wait()
        netns.popns()
        netns.remove(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
