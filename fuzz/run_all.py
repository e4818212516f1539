"""Run every fuzzer for a budget, each in its own process; exit 1 if any crashed.

    .venv/bin/python fuzz/run_all.py [--runs N | --seconds S] [--jobs J] [target ...]

Per fuzzer it prints the inputs executed (libFuzzer's final stats), crashes (inputs written
as crash-/timeout-/oom- artifacts, or an abnormal exit), wall time and inputs per second.
Logs go to <work>/<target>.log; new corpus entries to <work>/<target>/, never to the seeds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
TARGETS = ("imsg", "vhost_user", "virtqueue", "vnethdr", "config", "dhcp")

_EXECUTED = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.M)
_DONE = re.compile(r"^Done (\d+) runs in", re.M)
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    inputs: int
    crashes: int
    seconds: float
    returncode: int
    log: Path
    artifacts: list[str]

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


def parse_log(text: str) -> tuple[int, list[str]]:
    """(inputs executed, artifact paths) from a libFuzzer log."""
    for pattern in (_EXECUTED, _DONE, _PROGRESS):
        found = pattern.findall(text)
        if found:
            return int(found[-1]), _ARTIFACT.findall(text)
    return 0, _ARTIFACT.findall(text)


def run_one(
    target: str, budget: list[str], work: Path, artifacts: Path, python: str = sys.executable
) -> Result:
    log = work / f"{target}.log"
    env = {**os.environ, "VMD_FUZZ_WORK": str(work), "VMD_FUZZ_ARTIFACTS": str(artifacts)}
    argv = [python, str(FUZZ_DIR / f"fuzz_{target}.py"), *budget, "-print_final_stats=1"]
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    inputs, found = parse_log(text)
    crashes = len(found) or (1 if proc.returncode != 0 else 0)
    return Result(target, inputs, crashes, seconds, proc.returncode, log, found)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, default=1_000_000, help="inputs per fuzzer")
    budget.add_argument("--seconds", type=int, help="wall time per fuzzer instead of --runs")
    ap.add_argument("--jobs", type=int, default=1, help="fuzzers run at once")
    ap.add_argument("--work", type=Path, help="logs and new corpus entries (default: a tmpdir)")
    ap.add_argument("--artifacts", type=Path, default=FUZZ_DIR / "artifacts")
    ap.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    targets = [t for t in TARGETS if not args.targets or t in args.targets]
    flags = [f"-max_total_time={args.seconds}"] if args.seconds else [f"-runs={args.runs}"]
    work = args.work or Path(tempfile.mkdtemp(prefix="vmd-py-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)

    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = list(pool.map(lambda t: run_one(t, flags, work, args.artifacts), targets))

    print(f"{'fuzzer':<12} {'inputs':>10} {'crashes':>8} {'seconds':>9} {'exec/s':>8}")
    for r in results:
        print(f"{r.target:<12} {r.inputs:>10} {r.crashes:>8} {r.seconds:>9.1f} {r.rate:>8.0f}")
    print(f"logs in {work}")
    failed = [r for r in results if r.crashes]
    for r in failed:
        print(f"\n=== {r.target}: exit {r.returncode}, artifacts {r.artifacts or '-'}")
        print("\n".join(r.log.read_text(errors="replace").splitlines()[-40:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
