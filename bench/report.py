"""Turn the runs into the printed table and bench/results/latest.json."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# name -> (label, unit); the names are the JSON's metric keys.
METRICS: dict[str, tuple[str, str]] = {
    "tcp_g2h_gbps": ("TCP guest->host", "Gbit/s"),
    "tcp_h2g_gbps": ("TCP host->guest", "Gbit/s"),
    "rtt_g2h_ms": ("ping RTT guest->host", "ms"),
    "rtt_h2g_ms": ("ping RTT host->guest", "ms"),
    "boot_s": ("boot to network", "s"),
    "cpu_s_per_gb": ("CPU per GB, all", "s/GB"),
}
# CPU split by process: shown in the table, kept out of "metrics" in the JSON.
CPU_PARTS: dict[str, tuple[str, str]] = {
    "cpu_vionet_s_per_gb": ("CPU per GB, vionet", "s/GB"),
    "cpu_qemu_s_per_gb": ("CPU per GB, QEMU", "s/GB"),
    # While the pings run (one every 50-200 ms): what idling between frames costs.
    "cpu_ping_pct": ("CPU during pings, all", "% core"),
    "cpu_ping_vionet_pct": ("CPU during pings, vionet", "% core"),
}
OFFLOADS = ("all", "csum", "none")
# Sender-side TCP retransmissions per iperf3 test: direction -> Run.values name. Reported in
# their own table section and under "retransmits" in the JSON, not in "metrics".
RETRANS: dict[str, str] = {"g2h": "tcp_g2h_retrans", "h2g": "tcp_h2g_retrans"}
DIRECTIONS: dict[str, str] = {"g2h": "guest->host", "h2g": "host->guest"}
SIDES: dict[str, str] = {"vmd": "vmd-py (vionet)", "qemu": "QEMU virtio-net/tap"}


@dataclass
class Run:
    """One boot of one side: its measurements (metric name -> value)."""

    side: str  # "vmd" or "qemu"
    offload: str
    round: int
    values: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _values(runs: list[Run], side: str, offload: str, name: str) -> list[float]:
    return [r.values[name] for r in runs
            if r.side == side and r.offload == offload and name in r.values]


def _cell(xs: list[float]) -> str:
    if not xs:
        return "n.a."
    s = _stats(xs)
    return f"{s['median']:8.3f} [{s['min']:.3f}..{s['max']:.3f}]"


def _count(run: Run, name: str) -> int | None:
    value = run.values.get(name)
    return None if value is None else int(value)


def _long_entry(run: Run) -> dict[str, Any]:
    entry: dict[str, Any] = {d: _count(run, name) for d, name in RETRANS.items()}
    for name in ("tcp_g2h_gbps", "tcp_h2g_gbps", "cpu_s_per_gb"):
        if name in run.values:
            entry[name] = run.values[name]
    return entry


def retransmits(runs: list[Run], long_runs: list[Run], long_seconds: int) -> dict[str, Any]:
    """The JSON's "retransmits": per side and direction one count per round (offload all),
    and the long run's counts ("long" is null when there was none)."""
    out: dict[str, Any] = {}
    for side in SIDES:
        mine = sorted((r for r in runs if r.side == side and r.offload == "all"),
                      key=lambda r: r.round)
        out[side] = {d: [_count(r, name) for r in mine] for d, name in RETRANS.items()}
    out["long"] = {"seconds": long_seconds,
                   **{r.side: _long_entry(r) for r in long_runs}} if long_runs else None
    return out


def summary(runs: list[Run], rounds: int, extra: dict[str, Any],
            long_runs: list[Run] | None = None, long_seconds: int = 0) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name in [*METRICS, *CPU_PARTS]:
        vmd = _values(runs, "vmd", "all", name)
        qemu = _values(runs, "qemu", "all", name)
        if not vmd or not qemu:
            continue
        vm, qm = statistics.median(vmd), statistics.median(qemu)
        details[name] = {"vmd": _stats(vmd), "qemu": _stats(qemu)}
        if name in METRICS:
            metrics[name] = {"vmd": vm, "qemu": qm, "ratio": _ratio(vm, qm)}
    matrix: dict[str, Any] = {}
    for offload in OFFLOADS:
        row = {name: _stats(xs) for name in ("tcp_g2h_gbps", "tcp_h2g_gbps", "cpu_s_per_gb")
               if (xs := _values(runs, "vmd", offload, name))}
        if row:
            matrix[offload] = row
    return {
        "rounds": rounds, "metrics": metrics, "offload_matrix": matrix, "details": details,
        "retransmits": retransmits(runs, long_runs or [], long_seconds),
        **extra,
        "runs": [{"side": r.side, "offload": r.offload, "round": r.round, **r.values,
                  "info": r.info} for r in runs],
    }


def table(runs: list[Run], rounds: int, seconds: int) -> str:
    head = f"{'metric':<34}{'vmd-py (vionet)':>30}{'QEMU virtio-net/tap':>30}{'vmd/QEMU':>10}"
    lines = [f"vmd-py vs QEMU built-in virtio-net: {rounds} rounds, iperf3 {seconds} s, "
             "median [min..max]", head, "-" * len(head)]
    for name, (label, unit) in {**METRICS, **CPU_PARTS}.items():
        vmd = _values(runs, "vmd", "all", name)
        qemu = _values(runs, "qemu", "all", name)
        ratio = _ratio(statistics.median(vmd), statistics.median(qemu)) \
            if vmd and qemu else None
        shown = "n.a." if name == "cpu_vionet_s_per_gb" else _cell(qemu)
        lines.append(f"{label + ' (' + unit + ')':<34}{_cell(vmd):>30}{shown:>30}"
                     f"{'n.a.' if ratio is None else f'{ratio:.2f}':>10}")
    lines += ["", "vmd-py offload matrix (interface offload X), TCP Gbit/s, median [min..max]",
              f"{'offload':<10}{'guest->host':>30}{'host->guest':>30}{'CPU s/GB':>30}"]
    for offload in OFFLOADS:
        cells = [_cell(_values(runs, "vmd", offload, n))
                 for n in ("tcp_g2h_gbps", "tcp_h2g_gbps", "cpu_s_per_gb")]
        lines.append(f"{offload:<10}" + "".join(f"{c:>30}" for c in cells))
    lines += ["", "TCP retransmissions (sender side) per iperf3 test, median [min..max], "
              "total over all rounds",
              f"{'direction':<34}{SIDES['vmd']:>30}{SIDES['qemu']:>30}"]
    for d, name in RETRANS.items():
        cells = [_count_cell(_values(runs, side, "all", name)) for side in SIDES]
        lines.append(f"{DIRECTIONS[d]:<34}" + "".join(f"{c:>30}" for c in cells))
    return "\n".join(lines)


def _count_cell(xs: list[float]) -> str:
    if not xs:
        return "n.a."
    counts = [int(x) for x in xs]
    med = statistics.median(counts)
    shown = str(int(med)) if med == int(med) else f"{med:.1f}"
    return f"{shown} [{min(counts)}..{max(counts)}], total {sum(counts)}"


def long_table(long_runs: list[Run], seconds: int) -> str:
    """One row per side and direction of the long run: Gbit/s and retransmissions."""
    head = f"{'side':<24}{'direction':<16}{'Gbit/s':>10}{'retransmits':>14}"
    lines = [f"long run ({seconds} s per direction)", head, "-" * len(head)]
    for run in long_runs:
        for d, name in RETRANS.items():
            gbps = run.values.get(f"tcp_{d}_gbps")
            count = _count(run, name)
            lines.append(f"{SIDES.get(run.side, run.side):<24}{DIRECTIONS[d]:<16}"
                         f"{'n.a.' if gbps is None else f'{gbps:.3f}':>10}"
                         f"{'n.a.' if count is None else str(count):>14}")
    return "\n".join(lines)
