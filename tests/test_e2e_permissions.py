"""Who may do what through vmctl: a non-root client owns one VM and nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmd_harness import Vmd, wait_for

pytestmark = pytest.mark.e2e

# Numeric ids with no passwd/group entries: vm.conf and vmd must cope with bare numbers.
UID = 4242
GID = 4343


@pytest.fixture
def workdir() -> Iterator[Path]:
    # pytest's tmp_path sits under a 0700 directory the unprivileged client cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="vmd-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(vmd: Vmd, *args: str) -> subprocess.CompletedProcess[str]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(GID)
        os.setuid(UID)

    return subprocess.run(
        [sys.executable, "-m", "vmd_py.vmctl", "-s", vmd.socket, *args],
        capture_output=True, text=True, timeout=120, preexec_fn=drop,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_user_controls_only_its_own_vm(in_netns: str, workdir: Path, qemu_binary: str) -> None:
    conf = f"""
socket owner root:{GID}
vm "mine" {{
	disable
	memory 256M
	owner {UID}
}}
vm "theirs" {{
	disable
	memory 256M
}}
vm "tpl" {{
	disable
	memory 256M
	allow instance {{ memory, owner {UID} }}
}}
"""
    with Vmd(workdir, conf) as vmd:
        sock = os.stat(vmd.socket)
        assert (sock.st_gid, sock.st_mode & 0o777) == (GID, 0o660)
        res = as_user(vmd, "status")
        assert res.returncode == 0, res.stderr
        assert "mine" in res.stdout and "theirs" in res.stdout

        # Its own VM: start, status, stop.
        res = as_user(vmd, "start", "mine")
        assert res.returncode == 0, res.stderr
        assert vmd.status("mine")["state"] == "running"
        assert as_user(vmd, "status", "mine").returncode == 0

        # Someone else's VM, and every global request: EPERM, exit 1.
        vmd.vmctl("start", "theirs")
        for args in (("stop", "theirs"), ("stop", "-f", "theirs"), ("pause", "theirs"),
                     ("console", "theirs"), ("start", "-m", "300M", "theirs"),
                     ("reload",), ("load", str(vmd.conf)), ("reset",), ("reset", "vms"),
                     ("log", "verbose"), ("start", "-m", "256M", "adhoc"),
                     ("start", "-t", "theirs", "inst1"),
                     ("start", "-t", "tpl", "-i", "2", "inst2")):
            res = as_user(vmd, *args)
            assert res.returncode == 1, (args, res.stdout)
            assert "permission denied" in res.stderr or "no permission" in res.stderr, \
                (args, res.stderr)
        assert vmd.status("theirs")["state"] == "running"

        # An instance of a template that allows this user: owned by the user afterwards.
        res = as_user(vmd, "start", "-t", "tpl", "-m", "200M", "inst")
        assert res.returncode == 0, res.stderr
        assert vmd.status("inst")["owner"] == str(UID)

        # stop -a stops only what the user owns.
        res = as_user(vmd, "stop", "-a", "-f", "-w")
        assert res.returncode == 0, res.stderr
        assert vmd.status("inst")["state"] == "stopped"
        assert vmd.status("mine")["state"] == "stopped"
        assert vmd.status("theirs")["state"] == "running"
        res = as_user(vmd, "start", "mine")
        assert res.returncode == 0, res.stderr
        res = as_user(vmd, "stop", "-f", "-w", "mine")
        assert res.returncode == 0, res.stderr
        wait_for(lambda: vmd.status("mine")["state"] == "stopped", 20, "mine to stop")
        vmd.vmctl("stop", "-f", "-w", "theirs")
