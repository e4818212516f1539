"""Fuzz the vm.conf parser: any text raises only ConfigError or yields a Config.

Includes are confined to tests/conf (the fixtures): any other path is turned into a missing
file, so a fuzzed ``include "/dev/stdin"`` can neither block nor read the host's files.
"""

from __future__ import annotations

import os
from pathlib import Path

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
import lark  # not ours: imported before instrumentation so it is left alone
from _fuzzlib import ROOT, check

with atheris.instrument_imports(include=["vmd_py.config"]):
    from vmd_py.config import Config, ConfigError, parse_text
    from vmd_py.config import parser as _parser

assert lark

CONF_DIR = ROOT / "tests" / "conf"
# parse_text resolves relative includes against the directory of this (nonexistent) file.
FILENAME = str(CONF_DIR / "good" / "fuzz.conf")
_MISSING = CONF_DIR / "no-such-dir" / "blocked.conf"
_real_run_file = _parser._Session.run_file


def _confined_run_file(
    self: _parser._Session, path: Path, shown: str, at: tuple[str, int] | None
) -> None:
    real = os.path.realpath(path)
    if not (real.startswith(str(CONF_DIR) + os.sep) and os.path.isfile(real)):
        path = _MISSING
    _real_run_file(self, path, shown, at)


_parser._Session.run_file = _confined_run_file  # type: ignore[method-assign]


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        config = parse_text(text, FILENAME)
    except ConfigError as err:
        check(bool(err.diagnostics), "ConfigError without diagnostics")
        return
    check(isinstance(config, Config), "parse_text returned something else")


if __name__ == "__main__":
    _fuzzlib.main("config", test_one_input, max_len=4096)
