"""Shared plumbing for the fuzz scripts: paths, argv defaults, the atheris entry point.

Import this before anything from the project: it puts the repository root on sys.path (the
scripts run as ``python fuzz/fuzz_x.py``, so only fuzz/ is there) and must not import any
project module itself, or atheris could not instrument it afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
# New coverage-increasing inputs go to a scratch directory, never into the seed corpus.
WORK_DIR = Path(os.environ.get("VMD_FUZZ_WORK", Path(tempfile.gettempdir()) / "vmd-py-fuzz"))
ARTIFACT_DIR = Path(os.environ.get("VMD_FUZZ_ARTIFACTS", FUZZ_DIR / "artifacts"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Invariant(AssertionError):
    """A property the target promised does not hold for this input."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Invariant(what)


def libfuzzer_argv(target: str, argv: list[str], max_len: int) -> list[str]:
    """argv with per-target defaults filled in where the caller gave none."""
    flags = [a for a in argv[1:] if a.startswith("-")]
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    given = {a.split("=", 1)[0] for a in flags}
    extra: list[str] = []
    if "-max_len" not in given:
        extra.append(f"-max_len={max_len}")
    if "-timeout" not in given:
        extra.append("-timeout=10")
    if "-artifact_prefix" not in given:
        art = ARTIFACT_DIR / target
        art.mkdir(parents=True, exist_ok=True)
        extra.append(f"-artifact_prefix={art}/")
    if not dirs:
        work = WORK_DIR / target
        work.mkdir(parents=True, exist_ok=True)
        # libFuzzer writes new units into the first directory only.
        seeds = CORPUS_DIR / target
        seeds.mkdir(parents=True, exist_ok=True)
        dirs = [str(work), str(seeds)]
    return [argv[0], *flags, *extra, *dirs]


def main(target: str, test_one_input: Callable[[bytes], None], *, max_len: int = 4096) -> None:
    import atheris  # type: ignore[import-untyped]

    atheris.Setup(libfuzzer_argv(target, sys.argv, max_len), test_one_input)
    atheris.Fuzz()
