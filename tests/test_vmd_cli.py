"""``vmd -n -f FILE``: check a configuration, report problems as file:line: reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def vmd_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmd_py.vmd", "-n", "-f", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_good_configuration_exits_zero(tmp_path: Path) -> None:
    conf = tmp_path / "vm.conf"
    conf.write_text('switch "sw" { interface br9 }\n'
                    'vm "a" { memory 1G; interface { switch "sw" } }\n')
    res = vmd_check(conf)
    assert res.returncode == 0, res.stderr
    assert "configuration OK" in res.stdout


def test_bad_configuration_exits_one_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "vm.conf"
    conf.write_text('vm "a" {\n\tmemory 1G\n\tinterface { switch "nosuch" }\n\tmemory lots\n}\n')
    res = vmd_check(conf)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert any(line.startswith(f"{conf}:3: ") and "nosuch" in line for line in lines), lines
    assert any(line.startswith(f"{conf}:4: ") for line in lines), lines


def test_missing_configuration_exits_one(tmp_path: Path) -> None:
    res = vmd_check(tmp_path / "absent.conf")
    assert res.returncode == 1
    assert "absent.conf" in res.stderr
