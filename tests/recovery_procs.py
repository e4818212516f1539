"""Read a live process's family, fds and memory from /proc (crash-recovery tests, soak)."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command, which may itself hold spaces or ')'.
    return stat[stat.rindex(")") + 2] not in "ZX"


def ppid(pid: int) -> int:
    stat = (PROC / str(pid) / "stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (a scan of /proc: robust to any thread's children)."""
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if ppid(int(entry.name)) == pid and alive(int(entry.name)):
                out.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return sorted(out)


def control_pid(vmd_pid: int) -> int:
    """The daemon's control process: its child running vmd_py.control."""
    found = [p for p in children(vmd_pid) if "vmd_py.control" in cmdline(p)]
    if len(found) != 1:
        raise AssertionError(f"expected one control process under {vmd_pid}, found {found}")
    return found[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(PROC / str(pid) / "fd"))


def rss_kb(pid: int) -> int:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
