"""``vmctl``: control vmd through its control socket, after OpenBSD's vmctl(8)."""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import termios
import tty
from collections.abc import Callable
from typing import Any

from imsg.catalogue import CLIENT_FROM_CONTROL, MsgType
from imsg.channel import ImsgSocket
from imsg.codec import Imsg
from imsg.errors import ImsgError
from vmd_py.config.build import Invalid, parse_size
from vmd_py.config.model import DEFAULT_POLL_US

DEFAULT_SOCKET = "/run/vmd.sock"


class VmctlError(Exception):
    pass


def _size(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit}" if unit else f"{n}B"
        if n % 1024:
            return f"{n / 1024:.1f}{'KMGT'['KMGT'.index(unit) + 1] if unit else 'K'}"
        n //= 1024
    return str(n)


def _poll(poll_us: object) -> str:
    """The NIC's busy-poll window for ``status -v``; nothing when it is the default."""
    if not isinstance(poll_us, int) or poll_us == DEFAULT_POLL_US:
        return ""
    return " poll off" if poll_us == 0 else f" poll {poll_us}us"


def request(path: str, msg: Imsg) -> dict[str, Any]:
    """One request, one answer; raises VmctlError on a refusal or a broken daemon."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as exc:
        raise VmctlError(f"connect: {path}: {exc.strerror}") from None
    chan = ImsgSocket(sock, CLIENT_FROM_CONTROL)
    try:
        chan.send(msg)
        reply = chan.recv()
    except (ImsgError, EOFError, OSError) as exc:
        raise VmctlError(f"vmd: {exc}") from None
    finally:
        sock.close()
    if reply.type is MsgType.ERROR:
        raise VmctlError(f"vmd refused the request: {reply.payload['detail']}")
    if reply.type is MsgType.CTL_RESULT and not reply.payload["ok"]:
        raise VmctlError(reply.payload["message"])
    return reply.payload


def _print_status(vms: list[dict[str, Any]], verbose: bool) -> None:
    print(f"{'ID':>5} {'PID':>5} {'VCPUS':>5} {'MAXMEM':>7} {'CURMEM':>7} {'TTY':>7} "
          f"{'OWNER':>12} {'STATE':>8} NAME")
    for vm in vms:
        tty_name = vm["tty"].removeprefix("/dev/") if vm["tty"] != "-" else "-"
        print(f"{vm['id'] or '-':>5} {vm['pid'] or '-':>5} {vm['vcpus']:>5} "
              f"{_size(vm['maxmem']):>7} {_size(vm['curmem']) if vm['curmem'] else '-':>7} "
              f"{tty_name:>7} {vm['owner']:>12} {vm['state']:>8} {vm['name']}")
        if not verbose:
            continue
        for nic in vm.get("nics", []):
            print(f"      {nic['name']}: tap {nic['tap']} switch {nic['switch'] or '-'} "
                  f"lladdr {nic['lladdr']}{' locked' if nic['locked'] else ''} "
                  f"vionet pid {nic['vionet_pid'] or '-'} offload setting {nic['offload_setting']}"
                  f"{_poll(nic.get('poll_us'))}")
            print(f"        features acked: {' '.join(nic['features_acked']) or '-'}")
            print(f"        tap offload:    {' '.join(nic['tap_offload']) or '-'}")
            counters = nic.get("counters", {})
            std = " ".join(f"{k} {counters.get(k, 0)}" for k in
                           ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"))
            print(f"        {std}")
            drops = {k: v for k, v in counters.items() if "drop" in k or ("error" in k and v)}
            if drops:
                print("        drops: " + " ".join(f"{k} {v}" for k, v in sorted(drops.items())))


def console(path: str) -> int:
    """Attach to a VM's serial pty like cu(1); ``~.`` at the start of a line detaches."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    print(f"Connected to {path} (speed 115200)\r", file=sys.stderr)
    at_line_start, tilde = True, False
    try:
        while True:
            ready, _, _ = select.select([fd, stdin], [], [])
            if fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data:
                    break
                out = bytearray()
                for byte in data:
                    ch = bytes([byte])
                    if tilde:
                        tilde = False
                        if ch == b".":
                            return 0
                        out += b"~"
                    if at_line_start and ch == b"~":
                        tilde = True
                        continue
                    out += ch
                    at_line_start = ch in (b"\r", b"\n")
                os.write(fd, bytes(out))
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(fd)
        print("\r\n[EOT]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmctl", description="control the virtual machine daemon")
    p.add_argument("-s", dest="socket", default=DEFAULT_SOCKET, help="vmd control socket")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a VM (from vm.conf, an instance, or ad hoc)")
    s.add_argument("-c", action="store_true", help="attach to the console once started")
    s.add_argument("-L", action="store_true", help="add a local interface")
    s.add_argument("-B", dest="boot_device", choices=("disk", "cdrom", "net"),
                   help="boot with the firmware from this device (not the kernel)")
    s.add_argument("-b", dest="kernel", metavar="path", help="kernel to boot")
    s.add_argument("-d", dest="disks", metavar="disk", action="append", default=[],
                   help="disk image, [raw:|qcow2:]path (repeatable, at most 4)")
    s.add_argument("-i", dest="interfaces", metavar="count", type=int,
                   help="number of network interfaces")
    s.add_argument("-m", dest="memory", metavar="size", help="memory size (e.g. 512M)")
    s.add_argument("-n", dest="switches", metavar="switch", action="append", default=[],
                   help="add an interface on this switch (repeatable)")
    s.add_argument("-r", dest="cdrom", metavar="path", help="cdrom (ISO) image")
    s.add_argument("-t", dest="template", metavar="name",
                   help="start as an instance of this vm.conf VM")
    s.add_argument("name")
    s = sub.add_parser("stop", help="stop a VM (graceful: ACPI power button)")
    s.add_argument("-a", action="store_true", help="stop all VMs")
    s.add_argument("-f", action="store_true", help="force: SIGTERM, then SIGKILL after 10 s")
    s.add_argument("-w", action="store_true", help="wait until the VM has stopped")
    s.add_argument("name", nargs="?", default="")
    for cmd in ("status", "show"):
        s = sub.add_parser(cmd, help="show VMs")
        s.add_argument("-r", action="store_true", help="only running VMs")
        s.add_argument("-v", action="store_true", help="per-NIC detail")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        s.add_argument("name", nargs="?", default="")
    for cmd, what in (("pause", "pause a VM"), ("unpause", "resume a paused VM"),
                      ("wait", "wait for a VM to stop"), ("console", "attach to a VM's console")):
        s = sub.add_parser(cmd, help=what)
        s.add_argument("name")
    sub.add_parser("reload", help="reload vm.conf")
    s = sub.add_parser("load", help="load VMs and switches from a file, keeping the rest")
    s.add_argument("path")
    s = sub.add_parser("reset", help="reset vms, switches or all")
    s.add_argument("what", nargs="?", default="all", choices=("all", "vms", "switches"))
    s = sub.add_parser("log", help="log level")
    s.add_argument("level", choices=("brief", "verbose"))
    return p


def _disk(text: str) -> dict[str, Any]:
    fmt, sep, path = text.partition(":")
    if sep and fmt in ("raw", "qcow2"):
        return {"path": os.path.abspath(path), "format": fmt}
    return {"path": os.path.abspath(text)}


def start_options(args: argparse.Namespace) -> dict[str, Any]:
    """CTL_START's options from vmctl start's flags (the parent validates them again)."""
    opts: dict[str, Any] = {}
    if args.memory is not None:
        try:
            opts["memory"] = parse_size(args.memory)
        except Invalid as exc:
            raise VmctlError(f"start: {exc}") from None
    if args.kernel is not None:
        opts["kernel"] = os.path.abspath(args.kernel)
    if args.boot_device is not None:
        opts["boot_device"] = args.boot_device
    if args.disks:
        opts["disks"] = [_disk(d) for d in args.disks]
    if args.cdrom is not None:
        opts["cdrom"] = os.path.abspath(args.cdrom)
    if args.interfaces is not None:
        if args.interfaces < 0:
            raise VmctlError("start: invalid number of interfaces")
        opts["interfaces"] = args.interfaces
    if args.switches:
        opts["switches"] = list(args.switches)
    if args.L:
        opts["local"] = True
    if args.template is not None:
        opts["template"] = args.template
    return opts


def run(args: argparse.Namespace) -> int:
    path = args.socket
    cmd = args.command
    if cmd in ("status", "show"):
        payload = request(path, Imsg(MsgType.CTL_STATUS, {"name": args.name}))
        vms = payload["vms"]["list"]
        if args.r:
            vms = [vm for vm in vms if vm["pid"]]
        if args.json:
            print(json.dumps(vms if not args.name else vms[0], indent=2))
        else:
            _print_status(vms, args.v)
        return 0
    if cmd == "start":
        start: dict[str, Any] = {"name": args.name}
        opts = start_options(args)
        if opts:
            start["options"] = opts
        res = request(path, Imsg(MsgType.CTL_START, start))
        print(f"vmctl: {res['message']}")
        if args.c:
            res = request(path, Imsg(MsgType.CTL_CONSOLE, {"name": args.name}))
            return console(res["message"])
        return 0
    if cmd == "stop":
        if not args.a and not args.name:
            raise VmctlError("stop: a VM name or -a is needed")
        res = request(path, Imsg(MsgType.CTL_STOP, {
            "name": args.name, "force": args.f, "wait": args.w, "all": args.a}))
        print(f"vmctl: {res['message']}")
        return 0
    if cmd == "console":
        res = request(path, Imsg(MsgType.CTL_CONSOLE, {"name": args.name}))
        return console(res["message"])
    simple: dict[str, tuple[MsgType, Callable[[argparse.Namespace], dict[str, Any]]]] = {
        "pause": (MsgType.CTL_PAUSE, lambda a: {"name": a.name}),
        "unpause": (MsgType.CTL_UNPAUSE, lambda a: {"name": a.name}),
        "wait": (MsgType.CTL_WAIT, lambda a: {"name": a.name}),
        "reload": (MsgType.CTL_RELOAD, lambda a: {}),
        "load": (MsgType.CTL_LOAD, lambda a: {"path": os.path.abspath(a.path)}),
        "reset": (MsgType.CTL_RESET, lambda a: {"what": a.what}),
        "log": (MsgType.CTL_LOG, lambda a: {"verbose": a.level == "verbose"}),
    }
    msg_type, make = simple[cmd]
    res = request(path, Imsg(msg_type, make(args)))
    print(f"vmctl: {res['message']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except VmctlError as exc:
        print(f"vmctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
