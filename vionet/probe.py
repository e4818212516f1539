"""Privilege audit probes, run inside a sandboxed worker: which operations still work.

Each probe reports "ok" or the errno name it got. The audit expects EPERM (ENOSYS for clone3)
from everything a worker must never do, and "ok" (or EAGAIN for an empty tap) from what it
needs. Raw calls go through ctypes so a probe never takes a library's fallback path, and so this
package keeps no code path that configures devices.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.syscall.restype = ctypes.c_long

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNATTACHFILTER = 0x401054D5
SIOCSIFHWADDR = 0x8924
FIONBIO = 0x5421
HIGH_BITS = 0xFFFFFFFF00000000
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
AT_FDCWD = -100
MAP_FAILED = ctypes.c_void_p(-1).value
# x86_64 syscall numbers for calls glibc would not make the way we want to probe them.
SYS_OPEN = 2
SYS_CREAT = 85
SYS_PIVOT_ROOT = 155
SYS_OPENAT = 257
SYS_PERF_EVENT_OPEN = 298
SYS_PROCESS_VM_READV = 310
SYS_BPF = 321
SYS_EXECVEAT = 322
SYS_USERFAULTFD = 323
SYS_IO_URING_SETUP = 425
SYS_CLONE3 = 435
SYS_OPENAT2 = 437
SYS_KEYCTL = 250
SYS_TGKILL = 234

Probe = Callable[[], None]


class _Errno(OSError):
    pass


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise _Errno(err, os.strerror(err))


def _c(res: int) -> None:
    if res < 0:
        _raise_errno()


def _ioctl(fd: int, request: int, arg: int | ctypes.c_int = 0) -> None:
    ptr: ctypes.c_ulong | ctypes._Pointer[ctypes.c_int]
    ptr = ctypes.pointer(arg) if isinstance(arg, ctypes.c_int) else ctypes.c_ulong(arg)
    _c(_libc.ioctl(fd, ctypes.c_ulong(request), ptr))


def _syscall(nr: int, *args: int | bytes | None) -> None:
    _c(_libc.syscall(ctypes.c_long(nr), *args))


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, f"errno{e.errno}")


def _run(probe: Probe) -> str:
    try:
        probe()
    except OSError as e:
        return _errname(e)
    except RuntimeError as e:  # "can't start new thread"
        return f"RuntimeError: {e}"
    return "ok"


def _fresh_tun() -> None:
    # The audit probe: a sandboxed worker must FAIL to open the tun clone device (seccomp refuses
    # the open before any path lookup), and even then could not attach a new tap.
    fd = os.open("/dev/net/" + "tun", os.O_RDWR)
    try:
        ifr = struct.pack("16sH22x", b"vmdprobe%d", IFF_TAP | IFF_NO_PI)
        buf = ctypes.create_string_buffer(ifr, len(ifr))
        _c(_libc.ioctl(fd, ctypes.c_ulong(TUNSETIFF), buf))
    finally:
        os.close(fd)


def _fork() -> None:
    pid = os.fork()
    if pid == 0:  # not sandboxed after all: leave at once, the report says "ok"
        os._exit(0)
    os.waitpid(pid, 0)


def _exec() -> None:
    # "/" is a directory: without seccomp the kernel says EACCES, so the probe can never replace
    # this process; with seccomp the call is refused before the path is looked at.
    os.execv("/", ["/"])


def _mmap_exec() -> None:
    addr = _libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr == MAP_FAILED:
        _raise_errno()
    _libc.munmap(addr, mmap.PAGESIZE)


def _mprotect_exec() -> None:
    addr = _libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if addr == MAP_FAILED:
        _raise_errno()
    try:
        _c(_libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC))
    finally:
        _libc.munmap(addr, mmap.PAGESIZE)


def _mmap_rw() -> None:
    with mmap.mmap(-1, mmap.PAGESIZE) as m:
        m[:4] = b"vmd!"


def _thread() -> None:
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    t.start()
    t.join()
    if not box or box[0] == threading.get_native_id():
        raise RuntimeError("thread did not run")


def _eventfd() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.eventfd_write(fd, 3)
        if os.eventfd_read(fd) != 3:
            raise RuntimeError("eventfd lost a count")
    finally:
        os.close(fd)


def _socket(family: int, kind: int, proto: int = 0) -> Probe:
    def probe() -> None:
        socket.socket(family, kind, proto).close()
    return probe


def _socketpair() -> None:
    a, b = socket.socketpair()
    a.close()
    b.close()


# A 12-byte virtio_net_hdr (no offload, num_buffers 0) and a 60-byte broadcast ARP request from a
# locally administered MAC: harmless wherever the tap is.
_VNET_HDR = bytes(12)
_ARP_FRAME = (
    b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06"
    + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
    + b"\x02\x00\x00\x00\x00\x01" + bytes([10, 0, 0, 1]) + bytes(6) + bytes([10, 0, 0, 2])
).ljust(60, b"\0")


def _tap_probes(tap_fd: int) -> dict[str, Probe]:
    def readv() -> None:
        os.readv(tap_fd, [bytearray(12), bytearray(1514)])

    def writev() -> None:
        if os.writev(tap_fd, [_VNET_HDR, _ARP_FRAME]) != len(_VNET_HDR) + len(_ARP_FRAME):
            raise RuntimeError("short tap write")

    return {
        "tunsetoffload": lambda: _ioctl(tap_fd, TUNSETOFFLOAD, 0),
        "tunsetoffload_highbits": lambda: _ioctl(tap_fd, TUNSETOFFLOAD | HIGH_BITS, 0),
        "tunsetvnethdrsz": lambda: _ioctl(tap_fd, TUNSETVNETHDRSZ, ctypes.c_int(12)),
        "tunattachfilter": lambda: _ioctl(tap_fd, TUNATTACHFILTER, 0),
        "siocsifhwaddr": lambda: _ioctl(tap_fd, SIOCSIFHWADDR, 0),
        "fionbio": lambda: _ioctl(tap_fd, FIONBIO, ctypes.c_int(1)),
        "fionbio_highbits": lambda: _ioctl(tap_fd, FIONBIO | HIGH_BITS, ctypes.c_int(1)),
        "tap_writev": writev,
        "tap_readv": readv,
    }


def _probes() -> dict[str, Probe]:
    return {
        "tunsetiff_fresh": _fresh_tun,
        "open": lambda: _syscall(SYS_OPEN, b"/", os.O_RDONLY),
        "openat": lambda: os.close(os.open("/", os.O_RDONLY)),  # glibc's open() is openat
        "openat2": lambda: _syscall(SYS_OPENAT2, AT_FDCWD, b"/", None, 0),
        "creat": lambda: _syscall(SYS_CREAT, b"/vmd-probe", 0o600),
        "socket_inet": _socket(socket.AF_INET, socket.SOCK_DGRAM),
        "socket_inet6": _socket(socket.AF_INET6, socket.SOCK_DGRAM),
        "socket_unix": _socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "socket_netlink": _socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
        "socket_packet": _socket(socket.AF_PACKET, socket.SOCK_RAW, 0),
        "socketpair": _socketpair,
        "setns": lambda: _c(_libc.setns(0, CLONE_NEWNET)),
        "execve": _exec,
        "execveat": lambda: _syscall(SYS_EXECVEAT, AT_FDCWD, b"/", None, None, 0),
        "fork": _fork,
        "clone3": lambda: _syscall(SYS_CLONE3, None, 0),
        "kill": lambda: os.kill(1, 0),
        # No such filesystem type: unsandboxed this fails with ENODEV and mounts nothing.
        "mount": lambda: _c(
            _libc.mount(b"none", b"/", b"vmd-no-such-fs", ctypes.c_ulong(0), None)
        ),
        "chroot": lambda: os.chroot("/"),
        "pivot_root": lambda: _syscall(SYS_PIVOT_ROOT, b"/", b"/"),
        "process_vm_readv": lambda: _syscall(SYS_PROCESS_VM_READV, 1, None, 0, None, 0, 0),
        "bpf": lambda: _syscall(SYS_BPF, 0, None, 0),
        "perf_event_open": lambda: _syscall(SYS_PERF_EVENT_OPEN, None, 0, -1, -1, 0),
        "keyctl": lambda: _syscall(SYS_KEYCTL, 0, 0),
        "userfaultfd": lambda: _syscall(SYS_USERFAULTFD, 0),
        "io_uring_setup": lambda: _syscall(SYS_IO_URING_SETUP, 1, None),
        "memfd_create": lambda: os.close(os.memfd_create("vmd-probe")),
        "setuid_root": lambda: os.setuid(0),
        "prctl_dumpable": lambda: _c(_libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(1))),
        "prctl_set_name": lambda: _c(_libc.prctl(PR_SET_NAME, b"vmd-probe")),
        "tgkill_self": lambda: _syscall(SYS_TGKILL, os.getpid(), threading.get_native_id(), 0),
        "tgkill_other": lambda: _syscall(SYS_TGKILL, 1, 1, 0),  # signal 0: a no-op if allowed
        "mmap_exec": _mmap_exec,
        "mprotect_exec": _mprotect_exec,
        "mmap_rw": _mmap_rw,
        "thread": _thread,
        "eventfd": _eventfd,
    }


def _last_probes() -> dict[str, Probe]:
    # Last, because unsandboxed they change this process: a new user namespace loses the
    # capabilities other probes exercise, and PTRACE_TRACEME stops it at its next signal.
    return {
        "unshare": lambda: _c(_libc.unshare(CLONE_NEWUSER)),
        "ptrace": lambda: _c(_libc.ptrace(0, 0, None, None)),
    }


def run_probes(tap_fd: int | None, imsg_fd: int | None = None) -> dict[str, str]:
    """Run every probe; tap probes only when ``tap_fd`` is given.

    ``imsg_fd`` is accepted for symmetry with the worker's fds; sendmsg/recvmsg on it are proven
    by the imsg channel working at all, so no probe uses it.
    """
    del imsg_fd
    probes = _probes()
    if tap_fd is not None:
        probes.update(_tap_probes(tap_fd))
    probes.update(_last_probes())
    return {name: _run(probe) for name, probe in probes.items()}
