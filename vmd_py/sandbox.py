"""Sandbox for the children of the vmd parent: namespaces, empty root, no identity, no capability,
no_new_privs and seccomp.

A child starts as root (exec'd by the root parent), does all its imports, then calls
:func:`drop_privileges` while single-threaded, and :func:`lock_down` once the fds it will ever
need exist (e.g. inside ``trio.run``, after trio made its epoll fd and wakeup socketpair).
:func:`enter` does both. Every step is checked; a failure raises :class:`SandboxError` and the
caller must exit, never carry on half-sandboxed.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import signal
import threading
from typing import NoReturn

from vmd_py import seccomp_policy

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEFAULT_USER = "_vmd"
DEFAULT_EMPTY_ROOT = "/var/lib/vmd-py/empty"
NOFILE_LIMIT = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
)
_libc.unshare.argtypes = (ctypes.c_int,)


class SandboxError(RuntimeError):
    """A sandbox step failed: the process must not go on."""


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _check(res: int, what: str) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")
    return res


def _prctl(option: int, arg2: int = 0, what: str = "prctl") -> int:
    return _check(
        _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0),
                    ctypes.c_ulong(0)),
        what,
    )


def cap_last_cap() -> int:
    """The highest capability number this kernel knows (read from /proc: do it before chroot)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        raise SandboxError(f"cannot read cap_last_cap: {e}") from e


def _capsets() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread, all 64 bits."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def _clear_capsets() -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def _unshare_and_chroot(empty_root: str, namespaces: bool) -> None:
    if namespaces:
        _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        # Nothing we mount may propagate back to the host's mount namespace.
        _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    try:
        os.makedirs(empty_root, mode=0o755, exist_ok=True)
    except OSError as e:
        raise SandboxError(f"cannot create {empty_root}: {e}") from e
    st = os.lstat(empty_root)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise SandboxError(f"{empty_root} must be owned by root and not group/other-writable")
    if namespaces:
        # A fresh read-only tmpfs is empty whatever the directory holds on the host.
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        _check(
            _libc.mount(b"vmd-empty", empty_root.encode(), b"tmpfs", flags, b"size=4k,mode=0755"),
            f"mount tmpfs on {empty_root}",
        )
    elif os.listdir(empty_root):
        raise SandboxError(f"{empty_root} is not empty")
    try:
        os.chroot(empty_root)
        os.chdir("/")
    except OSError as e:
        raise SandboxError(f"chroot {empty_root}: {e}") from e


def _set_limits(*, fsize: bool = True) -> None:
    # RLIMIT_NPROC is left alone: it counts every thread of every worker sharing the uid, so a
    # tight value would let one worker starve another; seccomp already forbids fork.
    limits = {resource.RLIMIT_CORE: 0}  # guest memory must never land in a core file
    if fsize:
        limits[resource.RLIMIT_FSIZE] = 0  # no regular file grows (stdio: pipes or sockets)
        limits[resource.RLIMIT_NOFILE] = NOFILE_LIMIT
    for res, value in limits.items():
        _soft, hard = resource.getrlimit(res)
        new = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(res, (new, new))
        except (OSError, ValueError) as e:
            raise SandboxError(f"setrlimit({res}): {e}") from e


def _lookup(user: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError as e:
        raise SandboxError(f"no such user {user!r}") from e
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise SandboxError(f"user {user!r} is root")
    return pw.pw_uid, pw.pw_gid


def _become(uid: int, gid: int, user: str, last_cap: int) -> None:
    """Drop every capability (bounding and ambient too) and switch to uid/gid for good."""
    # Dropping from the bounding set needs CAP_SETPCAP, so before the uid changes.
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise SandboxError(f"cannot become {user}: {e}") from e
    # setresuid clears effective and permitted but keeps inheritable: clear all three.
    _clear_capsets()
    # Die with the parent (vmd) rather than linger as an orphan holding guest resources. The
    # kernel clears this on credential changes, so it is set after them; it survives execve.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "set parent-death signal")
    if os.getppid() == 1:
        raise SandboxError("the parent is already gone")


def drop_privileges(
    user: str = DEFAULT_USER,
    *,
    empty_root: str = DEFAULT_EMPTY_ROOT,
    namespaces: bool = True,
) -> None:
    """The privileged half: namespaces, empty root, user, capabilities, limits. Needs root."""
    if threading.active_count() != 1:
        # unshare(CLONE_NEWNS) and capability changes act on the calling thread only.
        raise SandboxError("drop_privileges must run before any thread is started")
    if os.geteuid() != 0:
        raise SandboxError("drop_privileges must start as root")
    last_cap = cap_last_cap()
    uid, gid = _lookup(user)
    _unshare_and_chroot(empty_root, namespaces)
    _become(uid, gid, user, last_cap)
    # Workers share a uid: non-dumpable keeps them from ptracing or reading each other's /proc.
    _prctl(PR_SET_DUMPABLE, 0, "clear dumpable")
    _set_limits()
    _verify_dropped(uid, gid, last_cap)


def exec_unprivileged(argv: list[str], user: str) -> NoReturn:
    """Replace this (root, single-threaded) process with ``argv`` running as ``user`` in fresh,
    empty network, IPC and UTS namespaces, with no capabilities and no_new_privs.

    For programs that need the filesystem (QEMU reads its kernel and firmware), so no chroot
    and no seccomp of ours: QEMU installs its own (-sandbox on).
    """
    if threading.active_count() != 1 or os.geteuid() != 0:
        raise SandboxError("exec_unprivileged needs a single-threaded root process")
    last_cap = cap_last_cap()
    uid, gid = _lookup(user)
    _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _become(uid, gid, user, last_cap)
    _set_limits(fsize=False)
    _verify_dropped(uid, gid, last_cap)
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    os.execv(argv[0], argv)


def _verify_dropped(uid: int, gid: int, last_cap: int) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SandboxError("uid/gid did not change")
    if os.getgroups() not in ([], [gid]):
        raise SandboxError(f"supplementary groups remain: {os.getgroups()}")
    if any(_capsets()):
        raise SandboxError(f"capabilities remain: {_capsets()}")
    for cap in range(last_cap + 1):
        if _prctl(PR_CAPBSET_READ, cap, "read bounding set"):
            raise SandboxError(f"capability {cap} is still in the bounding set")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SandboxError("setuid(0) succeeded after dropping privileges")


def lock_down(extra_ioctls: tuple[int, ...] = ()) -> None:
    """The final half: no_new_privs, then the seccomp filter (for every thread)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    if _prctl(PR_GET_NO_NEW_PRIVS, 0, "read no_new_privs") != 1:
        raise SandboxError("no_new_privs did not stick")
    try:
        seccomp_policy.install(extra_ioctls)
    except (OSError, ValueError) as e:
        raise SandboxError(f"seccomp: {e}") from e


def enter(
    user: str = DEFAULT_USER,
    *,
    empty_root: str = DEFAULT_EMPTY_ROOT,
    namespaces: bool = True,
    seccomp: bool = True,
) -> None:
    """Both halves at once, for children whose fds all exist already."""
    drop_privileges(user, empty_root=empty_root, namespaces=namespaces)
    if seccomp:
        lock_down()
    else:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
