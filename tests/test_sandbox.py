"""The sandbox of vmd's children: the policy table, and a live sandboxed child probed from inside
and inspected from outside (/proc)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pyseccomp
import pytest
from pyroute2 import IPRoute

from vmd_py import seccomp_policy
from vmd_py.seccomp_policy import POLICY, Action

REPO = Path(__file__).resolve().parent.parent
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_IOCTLS = {
    0x400454CA: "TUNSETIFF",
    0x400454D0: "TUNSETOFFLOAD",
    0x400454D8: "TUNSETVNETHDRSZ",
    0x401054D5: "TUNATTACHFILTER",
    0x400454DC: "TUNSETVNETLE",
    0x800454D2: "TUNGETIFF",
    0x8924: "SIOCSIFHWADDR",
    0x8914: "SIOCSIFFLAGS",
}

# Everything a sandboxed worker must be refused.
FORBIDDEN = (
    "tunsetiff_fresh", "open", "openat", "openat2", "creat", "socket_inet", "socket_inet6",
    "socket_unix", "socket_netlink", "socket_packet", "unshare", "setns", "execve", "tgkill_other",
    "execveat", "fork", "kill", "mount", "chroot", "pivot_root", "ptrace", "process_vm_readv",
    "bpf", "perf_event_open", "keyctl", "userfaultfd", "io_uring_setup", "memfd_create",
    "setuid_root", "prctl_dumpable", "mmap_exec", "mprotect_exec", "tunsetoffload",
    "tunsetoffload_highbits", "tunsetvnethdrsz", "tunattachfilter", "siocsifhwaddr",
    "fionbio_highbits",
)
ALLOWED = (
    "socketpair", "tgkill_self", "prctl_set_name", "mmap_rw", "thread", "eventfd", "fionbio",
    "tap_writev", "trio_thread", "trio_sleep",
)


# --- the table ------------------------------------------------------------------------------


def test_every_rule_has_a_reason_and_a_real_syscall() -> None:
    for rule in POLICY:
        assert rule.reason.strip(), rule
        nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall)
        assert nr >= 0, f"{rule.syscall} is not a syscall on this architecture"
    for ioc in seccomp_policy.ALLOWED_IOCTLS:
        assert ioc.reason.strip() and ioc.name


def test_refused_syscalls_have_no_allow_rule() -> None:
    allowed = {r.syscall for r in POLICY if r.action is Action.ALLOW}
    refused = {r.syscall for r in POLICY if r.action is not Action.ALLOW}
    assert not allowed & refused
    for name in ("open", "openat", "openat2", "socket", "execve", "unshare", "setns", "ptrace",
                 "mount", "bpf", "memfd_create", "io_uring_setup", "userfaultfd"):
        assert name in refused, name
    assert {r.action for r in POLICY if r.syscall == "clone3"} == {Action.ENOSYS}


def test_ioctl_allow_list_is_generic_only_and_exact() -> None:
    requests = {i.request for i in seccomp_policy.ALLOWED_IOCTLS}
    assert requests >= {0x5421, 0x5451, 0x5450}  # FIONBIO, FIOCLEX, FIONCLEX
    assert not requests & set(TUN_IOCTLS)
    assert not any(seccomp_policy.is_device_ioctl(r) for r in requests)
    for name in TUN_IOCTLS.values():
        assert name not in {i.name for i in seccomp_policy.ALLOWED_IOCTLS}
    ioctl_rules = [r for r in POLICY if r.syscall == "ioctl"]
    assert all(r.action is Action.ALLOW for r in ioctl_rules)
    # One exact (full 64-bit, unmasked) comparison of the request per rule.
    assert sorted(c.value for r in ioctl_rules for c in r.conds) == sorted(requests)
    assert all(len(r.conds) == 1 and r.conds[0].index == 1 and r.conds[0].mask is None
               for r in ioctl_rules)


def test_memory_and_clone_rules_are_conditional() -> None:
    by_name = {r.syscall: r for r in POLICY if r.action is Action.ALLOW}
    for name in ("mmap", "mprotect"):
        (cond,) = by_name[name].conds
        assert (cond.index, cond.mask, cond.value) == (2, seccomp_policy.PROT_EXEC, 0)
    (clone,) = by_name["clone"].conds
    assert clone.index == 0 and clone.mask is not None
    assert clone.mask & seccomp_policy.CLONE_THREAD and clone.value & seccomp_policy.CLONE_THREAD
    assert clone.mask & 0x10000000 and not clone.value & 0x10000000  # CLONE_NEWUSER
    unconditional = {r.syscall for r in POLICY if r.action is Action.ALLOW and not r.conds}
    assert not unconditional & {
        "ioctl", "clone", "mmap", "mprotect", "prctl", "fcntl", "socketpair", "tgkill",
        "setsockopt",
    }


@pytest.mark.parametrize("request_", sorted(TUN_IOCTLS))
def test_device_ioctls_cannot_be_added(request_: int) -> None:
    with pytest.raises(ValueError, match="device ioctls"):
        seccomp_policy.build(extra_ioctls=[request_])
    with pytest.raises(ValueError):
        seccomp_policy.build(extra_ioctls=[request_ | 0xFFFFFFFF00000000])


def _run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_filter_compares_full_64_bit_ioctl_requests() -> None:
    """Unprivileged check of the loaded filter: exact matches pass, high bits never do."""
    out = _run_python("""
        import ctypes, errno, socket
        from vmd_py import seccomp_policy
        libc = ctypes.CDLL(None, use_errno=True)
        a, b = socket.socketpair()
        seccomp_policy.install(extra_ioctls=[0x5413])  # TIOCGWINSZ, harmless
        def ioc(req):
            arg = ctypes.create_string_buffer(8)
            r = libc.ioctl(a.fileno(), ctypes.c_ulong(req), arg)
            return "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
        hi = 0xFFFFFFFF00000000
        print(ioc(0x5421), ioc(0x5421 | hi), ioc(0x5413), ioc(0x5413 | hi), ioc(0x5412))
    """)
    # FIONBIO ok; with high bits EPERM; the extra one reaches the driver (ENOTTY on a socket);
    # TIOCSTI is not listed.
    assert out.split() == ["ok", "EPERM", "ENOTTY", "EPERM", "EPERM"]


# --- a live sandboxed child -----------------------------------------------------------------


@pytest.fixture
def tap_fd(in_netns: str) -> Iterator[int]:
    """An attached tap with a 12-byte vnet header, up, inside the test's network namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack(
            "16sH22x", b"vmdsbx%d", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        name = ifr[:16].rstrip(b"\0").decode()
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        yield fd
    finally:
        os.close(fd)


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _spawn(tap_fd: int, empty_root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.sandbox_child", "--tap-fd", str(tap_fd),
         "--empty-root", str(empty_root), *extra],
        cwd=REPO, pass_fds=[tap_fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _results(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        pytest.fail(f"child reported nothing (rc={proc.returncode}): {proc.stderr.read()}")
    results: dict[str, str] = json.loads(line)
    return results


def _finish(proc: subprocess.Popen[str]) -> None:
    """Release the child (it waits for a line) and check it exited cleanly."""
    if proc.poll() is None:
        _out, err = proc.communicate("\n", timeout=30)
        assert proc.returncode == 0, err


@pytest.mark.audit
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["split", "enter"])
def test_sandboxed_child_is_refused_everything_but_packet_io(
    tap_fd: int, tmp_path: Path, mode: str,
) -> None:
    """split: privileges dropped first, seccomp inside trio.run (as vionet does); enter: all of
    it before trio.run, which must still start (epoll, wakeup socketpair) under the filter."""
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    proc = _spawn(tap_fd, empty, "--mode", mode)
    try:
        results = _results(proc)
        status = _status(proc.pid)
        ns = {k: os.readlink(f"/proc/{proc.pid}/ns/{k}") for k in ("net", "mnt", "ipc", "uts")}
        mine = {k: os.readlink(f"/proc/self/ns/{k}") for k in ns}
        fds = sorted(int(n) for n in os.listdir(f"/proc/{proc.pid}/fd"))
    finally:
        _finish(proc)

    wrong = {k: results[k] for k in FORBIDDEN if results[k] != "EPERM"}
    assert not wrong, f"not refused with EPERM: {wrong}"
    assert results["clone3"] == "ENOSYS"  # so glibc falls back to clone for threads
    broken = {k: results[k] for k in ALLOWED if results[k] != "ok"}
    assert not broken, f"needed operations failed: {broken}"
    # No frame is queued necessarily, but the read itself must be permitted.
    assert results["tap_readv"] in ("ok", "EAGAIN")

    uids = status["Uid"].split()
    assert len(set(uids)) == 1 and uids[0] != "0"
    assert status["Gid"].split()[0] != "0"
    assert status["Groups"] in ("", status["Gid"].split()[0])
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert status["Seccomp_filters"] == "1"
    for kind in ns:
        assert ns[kind] != mine[kind], f"{kind} namespace shared with the test"
    # stdio, the tap, and whatever trio made before lock-down; nothing was opened since.
    assert tap_fd in fds and len(fds) < 12, fds


@pytest.mark.audit
@pytest.mark.timeout(120)
def test_probes_succeed_without_the_sandbox(tap_fd: int, tmp_path: Path) -> None:
    """Control run: the same probes, unsandboxed root, do get through; so the refusals above are
    the sandbox's doing, and TUNSETOFFLOAD with high bits really reaches the tap."""
    proc = _spawn(tap_fd, tmp_path, "--mode", "control")
    try:
        results = _results(proc)
    finally:
        _finish(proc)
    for name in ("tunsetoffload", "tunsetoffload_highbits", "tunsetvnethdrsz", "fionbio_highbits",
                 "open", "openat", "socket_inet", "socket_netlink", "tunsetiff_fresh", "fork",
                 "mmap_exec", "mprotect_exec", "memfd_create", "tap_writev", "thread",
                 "tgkill_other"):
        assert results[name] == "ok", (name, results[name])
    assert results["execve"] == errno.errorcode[errno.EACCES]  # "/" is never executable
    assert results["mount"] == errno.errorcode[errno.ENODEV]  # probe mounts nothing


@pytest.mark.audit
def test_drop_privileges_refuses_unprivileged_caller() -> None:
    out = _run_python("""
        import os
        from vmd_py import sandbox
        os.setresgid(65534, 65534, 65534) if os.getuid() == 0 else None
        os.setresuid(65534, 65534, 65534) if os.getuid() == 0 else None
        try:
            sandbox.drop_privileges(empty_root="/nonexistent")
        except sandbox.SandboxError as e:
            print("refused:", e)
    """)
    assert out.startswith("refused:") and "root" in out
