"""Start a vionet worker: fork+exec of the same Python with exactly the fds it needs.

The worker begins as root only so it can enter its sandbox itself (namespaces, chroot, uid drop,
seccomp) after its imports and before it reads a single message; it receives no privileged fd
besides its attached tap.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from imsg.channel import socketpair

EMPTY_ROOT = "/var/lib/vmd-py/empty"
SANDBOX_USER = "_vmd"


@dataclass
class WorkerArgs:
    nic: str
    features: int
    mac: str | None = None
    locked: bool = False
    user: str = SANDBOX_USER
    empty_root: str = EMPTY_ROOT
    extra: list[str] = field(default_factory=list)
    # A local interface's /31 (dotted quads): the worker answers the guest's DHCP with them.
    local_guest: str | None = None
    local_host: str | None = None
    poll_us: int | None = None  # None: the worker's default


def ensure_empty_root(path: str = EMPTY_ROOT) -> None:
    """The directory workers chroot into: root-owned, not writable by them, and empty."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != 0 or st.st_mode & 0o022 or os.listdir(path):
        raise RuntimeError(f"{path} must be an empty root-owned directory")


def spawn_vionet(
    args: WorkerArgs, tap_fd: int, vhost_fd: int | None
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Returns the process and the parent's end of its imsg socket."""
    ensure_empty_root(args.empty_root)
    parent_end, child_end = socketpair()
    tap_dup = os.dup(tap_fd)
    fds = [child_end.fileno(), tap_dup]
    argv = [
        sys.executable, "-m", "vionet",
        "--nic", args.nic,
        "--imsg-fd", str(child_end.fileno()),
        "--tap-fd", str(tap_dup),
        "--features", hex(args.features),
        "--user", args.user,
        "--empty-root", args.empty_root,
    ]
    if vhost_fd is not None:
        fds.append(vhost_fd)
        argv += ["--vhost-fd", str(vhost_fd)]
    if args.mac:
        argv += ["--mac", args.mac]
    if args.locked:
        argv.append("--locked")
    if args.poll_us is not None:
        argv += ["--poll-us", str(args.poll_us)]
    if args.local_guest and args.local_host:
        argv += ["--local-guest", args.local_guest, "--local-host", args.local_host]
    argv += args.extra
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # A pipe, not our stderr: the worker runs with RLIMIT_FSIZE 0, and a write to a
            # regular log file would kill it; the parent relays its lines to the log.
            stderr=subprocess.PIPE,
            pass_fds=fds,
            close_fds=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        child_end.close()
        os.close(tap_dup)
    return proc, parent_end
