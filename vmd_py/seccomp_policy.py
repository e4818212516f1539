"""The seccomp policy of sandboxed children, as a table: one row per rule, each with its reason.

Anything not allowed fails with EPERM rather than killing the process, so a worker survives a
stray call and the audit tests can observe the refusal. Rows whose action is the default are
documentation (libseccomp refuses a rule that repeats the default action) and are checked by the
tests to have no ALLOW row beside them.

Argument conditions compare the full 64-bit register: libseccomp tests both halves on x86_64, so
an ioctl request with high bits set (which the kernel truncates to 32 bits) matches no row.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pyseccomp


class Action(enum.Enum):
    ALLOW = "allow"
    EPERM = "eperm"
    ENOSYS = "enosys"

    def scmp(self) -> int:
        if self is Action.ALLOW:
            return int(pyseccomp.ALLOW)
        return int(pyseccomp.ERRNO(errno.EPERM if self is Action.EPERM else errno.ENOSYS))


DEFAULT_ACTION = Action.EPERM


@dataclass(frozen=True)
class Cond:
    """``(arg[index] & mask) == value``; ``mask`` None means a plain 64-bit equality.

    ``own_pid`` makes ``value`` the pid of the process loading the filter.
    """

    index: int
    value: int
    mask: int | None = None
    own_pid: bool = False

    def scmp(self) -> pyseccomp.Arg:
        value = os.getpid() if self.own_pid else self.value
        if self.mask is None:
            return pyseccomp.Arg(self.index, pyseccomp.EQ, value)
        return pyseccomp.Arg(self.index, pyseccomp.MASKED_EQ, self.mask, value)


@dataclass(frozen=True)
class Rule:
    syscall: str
    action: Action
    conds: tuple[Cond, ...]
    reason: str


@dataclass(frozen=True)
class Ioctl:
    request: int
    name: str
    reason: str


# Generic fd ioctls only: none of these reaches a device driver or changes network state.
ALLOWED_IOCTLS: tuple[Ioctl, ...] = (
    Ioctl(0x5421, "FIONBIO", "socket.setblocking() sets O_NONBLOCK with it"),
    Ioctl(0x5451, "FIOCLEX", "os.set_inheritable(fd, False) uses it"),
    Ioctl(0x5450, "FIONCLEX", "os.set_inheritable(fd, True) uses it"),
    Ioctl(0x541B, "FIONREAD", "read-only: bytes queued on a socket"),
    Ioctl(0x5401, "TCGETS", "read-only: isatty() in CPython's io layer; no terminal is changed"),
)


def is_device_ioctl(request: int) -> bool:
    """True for the tun ioctls (_IO('T', >= 200)) and socket/wireless ones (0x89xx, 0x8bxx)."""
    if request < 0 or request > 0xFFFFFFFF:
        return True  # not a request the kernel sees as is: never allow it
    kind, nr = (request >> 8) & 0xFF, request & 0xFF
    tun = kind == ord("T") and nr >= 200
    return tun or (request <= 0xFFFF and kind in (0x89, 0x8B))


AF_UNIX = 1
SOL_SOCKET = 1
SO_SNDBUF = 7
SO_RCVBUF = 8
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
CLONE_VM = 0x100
CLONE_SIGHAND = 0x800
CLONE_THREAD = 0x10000
# clone() namespace flags (CLONE_NEWTIME shares its bit with CSIGNAL and only works with clone3).
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000
_THREAD_FLAGS = CLONE_VM | CLONE_SIGHAND | CLONE_THREAD
PR_SET_NAME = 15
PR_GET_NAME = 16
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_DUPFD_CLOEXEC = 1030


def _allow(syscall: str, reason: str, *conds: Cond) -> Rule:
    return Rule(syscall, Action.ALLOW, conds, reason)


def _deny(syscall: str, reason: str) -> Rule:
    return Rule(syscall, Action.EPERM, (), reason)


_IO = "I/O on fds the parent or QEMU handed over"
_SIG = "CPython and trio signal handling"
_ID = "read-only identity query"

POLICY: tuple[Rule, ...] = (
    # --- I/O on inherited fds (tap, imsg socket, vhost-user socket, eventfds, memfds) ---
    _allow("read", _IO),
    _allow("write", _IO),
    _allow("readv", "tap RX straight into guest buffers"),
    _allow("writev", "tap TX straight from guest buffers"),
    _allow("pread64", _IO),
    _allow("pwrite64", _IO),
    _allow("preadv", _IO),
    _allow("pwritev", _IO),
    _allow("recvmsg", "imsg and vhost-user messages carry fds (SCM_RIGHTS)"),
    _allow("sendmsg", "imsg and vhost-user messages carry fds (SCM_RIGHTS)"),
    _allow("recvfrom", "socket.recv() on the imsg and vhost-user sockets"),
    _allow("sendto", "socket.send() on the imsg and vhost-user sockets"),
    _allow("recvmmsg", "batched socket receive"),
    _allow("sendmmsg", "batched socket send"),
    _allow("accept4", "the parent hands vionet the listening end of the vhost-user socket"),
    _allow("accept", "as accept4"),
    _allow(
        "socketpair",
        "AF_UNIX only: trio.run makes its wakeup pair; an unconnected pair reaches nothing",
        Cond(0, AF_UNIX),
    ),
    *(
        _allow(
            "setsockopt",
            f"{name} only: trio shrinks its wakeup pair's buffers; no filters, marks or devices",
            Cond(1, SOL_SOCKET), Cond(2, opt),
        )
        for name, opt in (("SO_SNDBUF", SO_SNDBUF), ("SO_RCVBUF", SO_RCVBUF))
    ),
    _allow("shutdown", "closing one direction of an inherited socket"),
    _allow("getsockopt", "socket.socket(fileno=) asks SO_TYPE/SO_DOMAIN; SO_PEERCRED"),
    _allow("getsockname", "read-only socket query"),
    _allow("getpeername", "read-only socket query"),
    _allow("close", "dropping fds"),
    _allow("dup", "os.dup"),
    _allow("dup2", "os.dup2(inheritable=True)"),
    _allow("dup3", "os.dup2(inheritable=False)"),
    *(
        _allow("fcntl", f"fd flags and dup: cmd {cmd}", Cond(1, cmd))
        for cmd in (F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC)
    ),
    _allow("fstat", "os.fstat on an fd"),
    _allow(
        "newfstatat", "glibc's fstat is fstatat(fd, \"\", AT_EMPTY_PATH)",
        Cond(3, AT_EMPTY_PATH, AT_EMPTY_PATH),
    ),
    _allow("lseek", "io layer tell() on stdio"),
    *(
        _allow("ioctl", f"{i.name}: {i.reason}", Cond(1, i.request))
        for i in ALLOWED_IOCTLS
    ),
    # --- event loop ---
    _allow("poll", "trio and select module"),
    _allow("ppoll", "trio and select module"),
    _allow("select", "select module"),
    _allow("pselect6", "select module"),
    _allow("epoll_create1", "trio's epoll backend (a new loop after lock-down)"),
    _allow("epoll_ctl", "trio's epoll backend"),
    _allow("epoll_wait", "trio's epoll backend"),
    _allow("epoll_pwait", "trio's epoll backend"),
    _allow("epoll_pwait2", "trio's epoll backend"),
    _allow("eventfd2", "notifications between threads; vionet's own kick/call eventfds"),
    # --- threads and memory ---
    _allow("futex", "locks and thread joins"),
    _allow("set_robust_list", "glibc, every new thread"),
    _allow("rseq", "glibc registers rseq for every new thread"),
    _allow(
        "clone",
        "threads only (trio.to_thread): CLONE_VM|CLONE_SIGHAND|CLONE_THREAD set, no namespace "
        "flag; so no fork and no new namespace",
        Cond(0, _THREAD_FLAGS, _THREAD_FLAGS | CLONE_NS_FLAGS),
    ),
    Rule(
        "clone3", Action.ENOSYS, (),
        "its flags live in memory seccomp cannot read; ENOSYS makes glibc fall back to clone",
    ),
    _allow("mmap", "memory and guest memfds, never executable", Cond(2, 0, PROT_EXEC)),
    _allow("mprotect", "thread stack guards; never to executable", Cond(2, 0, PROT_EXEC)),
    _allow("munmap", "freeing memory"),
    _allow("mremap", "realloc of large blocks; keeps the protection"),
    _allow("madvise", "glibc frees thread stacks and arenas with it"),
    _allow("brk", "malloc"),
    _allow("exit", "thread exit"),
    _allow("exit_group", "process exit"),
    _allow("restart_syscall", "interrupted sleeps resume"),
    _allow("sched_yield", "lock back-off"),
    _allow("sched_getaffinity", "os.sched_getaffinity / cpu counting"),
    _allow("prctl", "thread names", Cond(0, PR_SET_NAME)),
    _allow("prctl", "thread names", Cond(0, PR_GET_NAME)),
    # --- signals ---
    _allow("rt_sigaction", _SIG),
    _allow("rt_sigprocmask", _SIG),
    _allow("rt_sigreturn", _SIG),
    _allow("sigaltstack", _SIG),
    _allow(
        "tgkill", "pthread_kill/raise to this process's own threads",
        Cond(0, 0, own_pid=True),
    ),
    # --- queries ---
    _allow("getpid", _ID),
    _allow("gettid", _ID),
    _allow("getuid", _ID),
    _allow("geteuid", _ID),
    _allow("getgid", _ID),
    _allow("getegid", _ID),
    _allow("getrandom", "os.urandom, hash seeds, random"),
    _allow("clock_gettime", "time, when the vDSO falls back to the syscall"),
    _allow("clock_getres", "time.get_clock_info"),
    _allow("gettimeofday", "time, when the vDSO falls back to the syscall"),
    _allow("clock_nanosleep", "time.sleep"),
    _allow("nanosleep", "time.sleep"),
    _allow("getrlimit", "read-only limit query"),
    _allow("prlimit64", "read-only: own limits, no new value", Cond(0, 0), Cond(2, 0)),
    _allow("uname", "os.uname; the UTS namespace is private"),
    # --- refused (the default refuses them too; listed to say why) ---
    _deny("open", "no filesystem access: everything arrives as an fd"),
    _deny("openat", "no filesystem access: everything arrives as an fd"),
    _deny("openat2", "no filesystem access: everything arrives as an fd"),
    _deny("creat", "no filesystem access"),
    _deny("open_by_handle_at", "filesystem access by handle escapes any root"),
    _deny("socket", "no new sockets: no netlink (tap config), no inet, no unix"),
    _deny("connect", "only the sockets handed over, as they are"),
    _deny("bind", "only the sockets handed over, as they are"),
    _deny("listen", "only the sockets handed over, as they are"),
    _deny("execve", "no new programs"),
    _deny("execveat", "no new programs"),
    _deny("fork", "no new processes"),
    _deny("vfork", "no new processes"),
    _deny("kill", "no signals to other processes (workers share a uid)"),
    _deny("tkill", "tgkill covers own threads"),
    _deny("unshare", "no new namespaces"),
    _deny("setns", "no joining namespaces"),
    _deny("ptrace", "no debugging other workers of the same uid"),
    _deny("process_vm_readv", "no reading other processes' memory"),
    _deny("process_vm_writev", "no writing other processes' memory"),
    _deny("mount", "no mounts"),
    _deny("umount2", "no mounts"),
    _deny("pivot_root", "no root changes"),
    _deny("chroot", "no root changes"),
    _deny("bpf", "no eBPF programs or maps"),
    _deny("perf_event_open", "kernel attack surface, side channels"),
    _deny("kexec_load", "kernel replacement"),
    _deny("kexec_file_load", "kernel replacement"),
    _deny("init_module", "kernel modules"),
    _deny("finit_module", "kernel modules"),
    _deny("delete_module", "kernel modules"),
    _deny("keyctl", "kernel keyrings"),
    _deny("add_key", "kernel keyrings"),
    _deny("request_key", "kernel keyrings"),
    _deny("userfaultfd", "classic exploit primitive"),
    _deny("io_uring_setup", "io_uring performs calls seccomp never sees"),
    _deny("io_uring_enter", "io_uring performs calls seccomp never sees"),
    _deny("io_uring_register", "io_uring performs calls seccomp never sees"),
    _deny("memfd_create", "vionet receives guest memfds from QEMU; it never creates one"),
    _deny("pipe2", "not needed: trio's wakeup socketpair exists before lock-down"),
    _deny("setuid", "identity is fixed before lock-down"),
    _deny("setresuid", "identity is fixed before lock-down"),
    _deny("setgid", "identity is fixed before lock-down"),
    _deny("setresgid", "identity is fixed before lock-down"),
    _deny("setgroups", "identity is fixed before lock-down"),
    _deny("capset", "capabilities are gone for good"),
    _deny("seccomp", "the filter is final (further filters could only narrow, but are unused)"),
    _deny("pkey_mprotect", "a way around the PROT_EXEC condition on mprotect"),
    _deny("remap_file_pages", "not needed"),
    _deny("setrlimit", "limits are fixed before lock-down"),
    _deny("getcwd", "no filesystem view"),
)


def build(extra_ioctls: Iterable[int] = ()) -> pyseccomp.SyscallFilter:
    """The filter for :data:`POLICY` plus ``extra_ioctls`` (never device ioctls), not loaded."""
    extra = tuple(extra_ioctls)
    bad = [hex(r) for r in extra if is_device_ioctl(r)]
    if bad:
        raise ValueError(f"device ioctls may not be allowed in a sandbox: {', '.join(bad)}")
    filt = pyseccomp.SyscallFilter(DEFAULT_ACTION.scmp())
    # Every thread, including any trio or the interpreter started, gets the same filter.
    filt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
    filt.set_attr(pyseccomp.Attr.CTL_NNP, 1)
    for rule in POLICY:
        if rule.action is DEFAULT_ACTION:
            continue  # the default action covers it (libseccomp refuses the duplicate)
        filt.add_rule(rule.action.scmp(), rule.syscall, *(c.scmp() for c in rule.conds))
    for request in extra:
        filt.add_rule(Action.ALLOW.scmp(), "ioctl", Cond(1, request).scmp())
    return filt


def install(extra_ioctls: Iterable[int] = ()) -> None:
    """Load the filter into every thread of this process; it cannot be removed."""
    build(extra_ioctls).load()
