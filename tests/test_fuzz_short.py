"""A short atheris run of every fuzzer in fuzz/ (``make fuzz`` runs the long one).

Each fuzzer runs a few thousand inputs over the committed seed corpus plus seeds freshly made
by fuzz/make_corpus.py (so the corpus builder and the input layouts cannot rot unnoticed); the
run must execute them all and find no crash.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = ("imsg", "vhost_user", "virtqueue", "vnethdr", "config", "dhcp")
RUNS = 3000

pytestmark = [
    pytest.mark.hostile,
    pytest.mark.skipif(
        importlib.util.find_spec("atheris") is None,
        reason="atheris is not installed (pip install atheris==3.0.0)",
    ),
]


@pytest.fixture(scope="module")
def fresh_seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seeds")
    proc = subprocess.run(
        [sys.executable, str(FUZZ / "make_corpus.py"), "--out", str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for target in TARGETS:
        assert len(list((out / target).iterdir())) >= 5, f"few seeds for {target}"
    return out


def _executed(log: str) -> int:
    found = re.findall(r"^stat::number_of_executed_units:\s*(\d+)", log, re.M)
    return int(found[-1]) if found else 0


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzer_short_run_finds_nothing(target: str, fresh_seeds: Path, tmp_path: Path) -> None:
    committed = FUZZ / "corpus" / target
    seeds = sorted(committed.iterdir())
    assert seeds, f"{committed} is empty: run fuzz/make_corpus.py"
    before = {p.name for p in seeds}
    work = tmp_path / "work"
    work.mkdir()
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "VMD_FUZZ_ARTIFACTS": str(artifacts), "VMD_FUZZ_WORK": str(work)}
    proc = subprocess.run(
        [
            sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-runs={RUNS}", "-seed=1",
            "-print_final_stats=1", str(work), str(committed), str(fresh_seeds / target),
        ],
        capture_output=True, text=True, env=env, check=False, timeout=300,
    )
    log = proc.stdout + proc.stderr
    crashes = sorted(p.name for p in artifacts.rglob("*") if p.is_file())
    assert proc.returncode == 0 and not crashes, f"{crashes}\n{log[-4000:]}"
    n_seeds = len(before) + len(list((fresh_seeds / target).iterdir()))
    assert _executed(log) >= max(RUNS, n_seeds), log[-2000:]
    # New coverage went to the scratch directory, never into the committed seeds.
    assert {p.name for p in committed.iterdir()} == before
