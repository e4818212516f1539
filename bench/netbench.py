"""Network benchmark: vmd-py's vionet against QEMU's built-in virtio-net on a tap.

Each run boots the default guest in a network namespace of its own (created and removed
here), measures boot-to-network time, ping RTT both ways, iperf3 TCP both ways and the CPU
time of vionet and QEMU per GB moved, and the TCP retransmissions of each iperf3 sender.
Rounds alternate which side goes first; the vmd-py offload matrix (offload all / csum / none)
is measured in every round too. --long S adds one S-second iperf3 per direction and side.

    python -m bench.netbench [--rounds N] [--seconds S] [--long S]   (as root; see README)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Literal

from bench.measure import cpu_now, guest_ping_ms, host_ping_ms, iperf3
from bench.report import Run, long_table, summary, table
from bench.sides import (
    CMDLINE,
    GUEST_IP,
    HOST_IP,
    MEMORY_MB,
    Offload,
    fresh_netns,
    qemu_guest,
    vmd_guest,
)
from vmd_py.accel import kvm_status
from vmd_py.config.build import Invalid, parse_poll
from vmd_py.guest_image import GuestImage, ensure_guest_image

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def measure(side: str, offload: Offload, rnd: int, seconds: int, image: GuestImage,
            accel: Literal["kvm", "tcg"], full: bool, poll: str | None = None) -> Run:
    """Boot one side, measure it, tear it down; full adds the RTTs (offload runs skip them)."""
    run = Run(side, offload, rnd)
    with tempfile.TemporaryDirectory(prefix="vmdbench-") as tmp, fresh_netns():
        workdir = Path(tmp)
        guest = vmd_guest(workdir, offload, poll) if side == "vmd" \
            else qemu_guest(workdir, image, accel)
        with guest as booted:
            run.info = booted.info
            run.values["boot_s"] = booted.boot_s
            if full:
                began = time.monotonic()
                before = cpu_now(booted.pids)
                run.values["rtt_h2g_ms"] = host_ping_ms(GUEST_IP)
                run.values["rtt_g2h_ms"] = guest_ping_ms(booted.console, HOST_IP)
                wall = time.monotonic() - began
                after = cpu_now(booted.pids)
                used = {role: after[role] - before[role] for role in before}
                run.values["cpu_ping_pct"] = 100 * sum(used.values()) / wall
                if "vionet" in used:
                    run.values["cpu_ping_vionet_pct"] = 100 * used["vionet"] / wall
            g2h = iperf3(GUEST_IP, seconds, True, booted.pids)
            h2g = iperf3(GUEST_IP, seconds, False, booted.pids)
    run.values["tcp_g2h_gbps"] = g2h.gbps
    run.values["tcp_h2g_gbps"] = h2g.gbps
    if g2h.retransmits is not None:
        run.values["tcp_g2h_retrans"] = g2h.retransmits
    if h2g.retransmits is not None:
        run.values["tcp_h2g_retrans"] = h2g.retransmits
    gb = (g2h.bytes + h2g.bytes) / 1e9
    cpu = {role: g2h.cpu[role] + h2g.cpu[role] for role in g2h.cpu}
    run.values["cpu_qemu_s_per_gb"] = cpu["qemu"] / gb
    if "vionet" in cpu:
        run.values["cpu_vionet_s_per_gb"] = cpu["vionet"] / gb
    run.values["cpu_s_per_gb"] = sum(cpu.values()) / gb
    return run


def _brief(run: Run) -> str:
    return ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.3f}"
                     for k, v in run.values.items())


def _poll(text: str) -> str:
    try:
        parse_poll(text)
    except Invalid as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _terminate(signum: int, frame: FrameType | None) -> None:
    # As an exception, so every finally block (processes, namespaces) still runs.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    ap.add_argument("--seconds", type=int, default=10, help="iperf3 time per test (default 10)")
    ap.add_argument("--no-offload-matrix", action="store_true",
                    help="skip the vmd-py offload csum/none runs")
    ap.add_argument("--long", type=int, default=0, metavar="SECONDS",
                    help="after the rounds, one iperf3 of SECONDS per direction on each side "
                         "(default 0: off)")
    ap.add_argument("--vmd-poll", metavar="TIME", type=_poll,
                    help="vm.conf 'poll' for vmd-py's NIC, e.g. 1s (default: vionet's, 1ms); "
                         "a long window trades a busy core for latency")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, taps, the vmd daemon)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.seconds < 1:
        ap.error("--rounds and --seconds must be at least 1")
    if args.long < 0:
        ap.error("--long must not be negative")
    signal.signal(signal.SIGTERM, _terminate)
    image = ensure_guest_image()
    accel, why = kvm_status()
    log(f"accelerator {accel} ({why}); {os.cpu_count()} host CPUs")

    runs: list[Run] = []
    began = time.monotonic()
    for rnd in range(args.rounds):
        plan: list[tuple[str, Offload, bool]] = [("vmd", "all", True), ("qemu", "all", True)]
        if rnd % 2:
            plan.reverse()
        if not args.no_offload_matrix:
            plan += [("vmd", "csum", False), ("vmd", "none", False)]
        for side, offload, full in plan:
            log(f"round {rnd + 1}/{args.rounds}: {side} offload {offload}")
            run = measure(side, offload, rnd, args.seconds, image, accel, full, args.vmd_poll)
            log("  " + _brief(run))
            runs.append(run)

    long_runs: list[Run] = []
    if args.long:
        for side in ("vmd", "qemu"):
            log(f"long run: {side}, {args.long} s per direction")
            run = measure(side, "all", args.rounds, args.long, image, accel, False,
                          args.vmd_poll)
            log("  " + _brief(run))
            long_runs.append(run)

    print(table(runs, args.rounds, args.seconds))
    if args.vmd_poll:
        print(f"vmd-py's NIC busy-polls for {args.vmd_poll} after traffic (vm.conf poll)")
    if long_runs:
        print()
        print(long_table(long_runs, args.long))
    extra = {
        "seconds": args.seconds, "accel": accel, "host_cpus": os.cpu_count(),
        "vmd_poll": args.vmd_poll or "default",
        "guest": {"kernel": image.version, "memory_mb": MEMORY_MB, "vcpus": 1,
                  "cmdline": CMDLINE},
        "wall_s": round(time.monotonic() - began, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = summary(runs, args.rounds, extra, long_runs, args.long)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
