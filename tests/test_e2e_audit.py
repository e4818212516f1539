"""Privilege audit of a running VM: its vionet worker and its QEMU."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tests.test_audit import assert_sandboxed, fd_kinds, proc_status
from tests.test_e2e_guest import conf
from tests.vmd_harness import Vmd

pytestmark = [pytest.mark.e2e, pytest.mark.audit]


def test_running_vm_processes_are_confined(in_netns: str, tmp_path: Path,
                                           qemu_binary: str) -> None:
    name = "audit"
    with Vmd(tmp_path, conf(name, "10.77.0.2")) as vmd:
        vmd.wait_ready(name)
        status = vmd.status(name)
        worker = status["nics"][0]["vionet_pid"]
        assert_sandboxed(worker)
        kinds = fd_kinds(worker)
        # Beyond the worker's own fds: what QEMU sent it (guest RAM memfd, kick/call
        # eventfds) and the accepted vhost-user connection; never a path on the host.
        assert kinds.count("/dev/net/tun") == 1
        assert any(k.startswith("/memfd:") for k in kinds), kinds
        assert all(k.startswith(("/dev/null", "/dev/net/tun", "/memfd:", "anon_inode:",
                                 "socket", "pipe")) for k in kinds), kinds

        qemu = status["pid"]
        st = proc_status(qemu)
        vmuser = pwd.getpwnam("_vmdvm")
        assert st["Uid"].split() == [str(vmuser.pw_uid)] * 4
        assert st["Gid"].split() == [str(vmuser.pw_gid)] * 4
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[caps], 16) == 0, (caps, st[caps])
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # QEMU's own -sandbox on
        assert os.readlink(f"/proc/{qemu}/ns/net") != os.readlink("/proc/self/ns/net")
        # An empty network namespace: loopback only.
        devices = [line.split(":")[0].strip()
                   for line in Path(f"/proc/{qemu}/net/dev").read_text().splitlines()[2:]]
        assert devices == ["lo"]
        # And QEMU is not the workers' user: it cannot signal or ptrace them.
        assert proc_status(worker)["Uid"].split()[0] != str(vmuser.pw_uid)

        # CPU placement: the vCPU thread on the VM's home CPU, every worker thread elsewhere.
        if len(os.sched_getaffinity(0)) >= 2:
            cpus = status["cpus"]
            assert set(cpus["vcpus"]).isdisjoint(cpus["vionet"]), cpus
            for tid in os.listdir(f"/proc/{qemu}/task"):
                if Path(f"/proc/{qemu}/task/{tid}/comm").read_text().startswith("CPU "):
                    assert os.sched_getaffinity(int(tid)) == set(cpus["vcpus"])
            tids = os.listdir(f"/proc/{worker}/task")
            assert len(tids) >= 2  # the trio thread and the packet engine
            for tid in tids:
                assert os.sched_getaffinity(int(tid)) == set(cpus["vionet"])
        vmd.vmctl("stop", "-w", name)
