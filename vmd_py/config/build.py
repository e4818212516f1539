"""Turn parsed statements into the model, checking semantics as vm.conf(5) and vmd do."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from lark import Token, Tree

from .errors import Diagnostic
from .model import (
    MAX_DISKS,
    MAX_MEMORY,
    MAX_NICS,
    MAX_POLL_US,
    MIB,
    MIN_MEMORY,
    BootDevice,
    Config,
    DiskConf,
    NicConf,
    Offload,
    Owner,
    SwitchConf,
    VmConf,
)

_SIZE = re.compile(r"([0-9]+)(?:\.([0-9]+))?([bkmgtpe]?)", re.IGNORECASE)
_SCALE = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_VM_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_MACRO_NAME = re.compile(r"[A-Za-z0-9_]+")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?|[0-9]+")
_MAC = re.compile(r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}")
VM_NAME_MAX = 63  # vmd's VMM_MAX_NAME_LEN minus the NUL
IFNAME_MAX = 15  # Linux IFNAMSIZ minus the NUL
_OFFLOADS: dict[str, Offload] = {"all": "all", "csum": "csum", "none": "none"}
_BOOT_DEVICES: dict[str, BootDevice] = {"disk": "disk", "cdrom": "cdrom", "net": "net"}


class Invalid(Exception):
    """A semantic error in one option; the builder records it and carries on."""


_POLL = re.compile(r"(\d+)(us|ms|s)")
_POLL_SCALE = {"us": 1, "ms": 1000, "s": 1_000_000}


def parse_poll(text: str) -> int:
    """``poll`` as microseconds: ``off`` or ``0``, or a whole number with us, ms or s."""
    if text in ("off", "0"):
        return 0
    match = _POLL.fullmatch(text)
    if match is None:
        raise Invalid(f"invalid poll: {text} (expected off, or a time such as 500us, 1ms, 1s)")
    value = int(match.group(1)) * _POLL_SCALE[match.group(2)]
    if value > MAX_POLL_US:
        raise Invalid(f"invalid poll: {text} (at most 1s)")
    return value


def parse_size(text: str) -> int:
    """Bytes from a scan_scaled(3)-style size: 512M, 1.5G, 1048576 (bare = bytes)."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise Invalid(f"invalid size: {text}")
    whole, frac, unit = m.groups()
    scale: int = 1024 ** _SCALE[unit.lower()]
    value = int(whole) * scale
    if frac:
        value += int(frac) * scale // 10 ** len(frac)
    return value


def parse_mac(text: str) -> str:
    """Canonical lowercase MAC for a unicast, non-zero Ethernet address."""
    if _MAC.fullmatch(text) is None:
        raise Invalid(f"invalid lladdr: {text}")
    octets = [int(part, 16) for part in text.split(":")]
    if octets[0] & 1:
        raise Invalid(f"invalid lladdr: {text} (multicast address)")
    if not any(octets):
        raise Invalid(f"invalid lladdr: {text} (all zeros)")
    return ":".join(f"{o:02x}" for o in octets)


def parse_owner(text: str) -> Owner:
    """``user``, ``user:group`` or ``:group`` (names or numeric ids)."""
    user, sep, group = text.partition(":")
    if (not user and not group) or (sep and not group):
        raise Invalid(f"invalid owner: {text}")
    for part in (user, group):
        if part and _ACCOUNT.fullmatch(part) is None:
            raise Invalid(f"invalid owner: {text}")
    return Owner(user or None, group or None)


def check_ifname(name: str, what: str) -> str:
    """A name Linux accepts for a network interface (dev_valid_name)."""
    bad = (
        not name
        or len(name) > IFNAME_MAX
        or name in (".", "..")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in name)
    )
    if bad:
        raise Invalid(f"invalid {what}: {name}")
    return name


def check_group(name: str) -> str:
    """Interface group names: at most 15 characters, not ending with a digit (ifconfig(8))."""
    if not name or len(name) > IFNAME_MAX or name[-1].isdigit() or not name.isprintable():
        raise Invalid(f"invalid group name: {name}")
    return name


@dataclass
class _VmState:
    """Book-keeping for one vm block while it is built."""

    vm: VmConf
    explicit: set[str] = field(default_factory=set)
    nics: list[NicConf] = field(default_factory=list)
    interfaces_n: int | None = None
    interfaces_line: int = 0


class Builder:
    """Accumulates statements (in file order) into a Config, collecting diagnostics."""

    def __init__(self, diags: list[Diagnostic]) -> None:
        self.diags = diags
        self.config = Config()
        self.switch_refs: list[tuple[str, str, int, str]] = []  # file, vm, line, switch
        self.taps: dict[str, tuple[str, int]] = {}
        self.macs: dict[str, str] = {}

    # -- helpers --------------------------------------------------------------------

    def error(self, file: str, line: int, reason: str) -> None:
        self.diags.append(Diagnostic(file, line, reason))

    @staticmethod
    def _tok(tree: Tree[Token], type_: str) -> Token | None:
        for child in tree.children:
            if isinstance(child, Token) and child.type == type_:
                return child
        return None

    @staticmethod
    def _strings(tree: Tree[Token]) -> list[Token]:
        """The value tokens of the ``string`` sub-rules, in order."""
        out: list[Token] = []
        for child in tree.children:
            if isinstance(child, Tree) and child.data == "string":
                tok = child.children[0]
                assert isinstance(tok, Token)
                out.append(tok)
        return out

    @staticmethod
    def _line(tree: Tree[Token]) -> int:
        for tok in tree.scan_values(lambda v: isinstance(v, Token)):
            return int(tok.line or 0)
        return 0

    @staticmethod
    def _path(value: str, base: Path | None) -> str:
        if base is not None and value and not value.startswith("/"):
            return str(base / value)
        return value

    # -- statements -----------------------------------------------------------------

    def macro(self, tree: Tree[Token], file: str) -> None:
        name_tok = tree.children[0]
        assert isinstance(name_tok, Token)
        value = self._strings(tree)[0]
        if _MACRO_NAME.fullmatch(name_tok) is None:
            self.error(file, int(name_tok.line or 0), f"invalid macro name: {name_tok}")
            return
        self.config.macros[str(name_tok)] = str(value)

    def global_opt(self, tree: Tree[Token], file: str) -> None:
        line = self._line(tree)
        try:
            self._global_opt(tree)
        except Invalid as exc:
            self.error(file, line, str(exc))

    def _global_opt(self, tree: Tree[Token]) -> None:
        cfg = self.config
        args = self._strings(tree)
        if tree.data == "local_prefix":
            cfg.local_prefix = _prefix4(str(args[0]))
        elif tree.data == "local_inet6":
            cfg.local_inet6 = True
            cfg.local_prefix6 = _prefix6(str(args[0])) if args else None
        elif tree.data == "socket_owner":
            owner = parse_owner(str(args[0]))
            default = Owner("root", "root")
            cfg.socket_owner = Owner(owner.user or default.user, owner.group or default.group)
        elif tree.data == "staggered":
            nums = [int(t) for t in tree.children if isinstance(t, Token) and t.type == "NUMBER"]
            if nums[0] < 1:
                raise Invalid(f"invalid parallelism: {nums[0]}")
            if not 0 <= nums[1] <= 86400:
                raise Invalid(f"invalid delay: {nums[1]}")
            cfg.staggered_start = True
            cfg.staggered_parallel, cfg.staggered_delay = nums

    def switch(self, tree: Tree[Token], file: str, partial: bool = False) -> None:
        """partial: options with syntax errors were dropped, so skip completeness checks."""
        name_tok = self._strings(tree)[0]
        line = int(name_tok.line or 0)
        sw = SwitchConf(name=str(name_tok), ifname="", line=line, file=file)
        ok = True
        if not sw.name:
            self.error(file, line, "switch name must not be empty")
            ok = False
        seen: set[str] = set()
        for opt in tree.children:
            if not isinstance(opt, Tree):
                continue
            if opt.data == "string":
                continue
            try:
                self._switch_opt(sw, opt, seen)
            except Invalid as exc:
                self.error(file, self._line(opt), str(exc))
                ok = False
        if not sw.ifname and not partial:
            self.error(file, line, f'switch "{sw.name}" is missing interface name')
            ok = False
        prev = self.config.switches.get(sw.name)
        if prev is not None:
            self.error(
                file,
                line,
                f'switch "{sw.name}" defined more than once (first at {prev.file}:{prev.line})',
            )
        elif ok:
            self.config.switches[sw.name] = sw

    def _switch_opt(self, sw: SwitchConf, opt: Tree[Token], seen: set[str]) -> None:
        kind = opt.data
        if kind in ("ifname", "group"):
            if kind in seen:
                raise Invalid(
                    f"{'interface' if kind == 'ifname' else kind} specified more than once"
                )
            seen.add(kind)
        value = str(self._strings(opt)[0]) if self._strings(opt) else ""
        if kind == "enable":
            sw.enabled = True
        elif kind == "disable":
            sw.enabled = False
        elif kind == "up":
            sw.up = True
        elif kind == "down":
            sw.up = False
        elif kind == "group":
            sw.group = check_group(value)
        elif kind == "ifname":
            sw.ifname = check_ifname(value, "switch interface")
        elif kind == "locked":
            sw.locked_lladdr = True
        elif kind == "rdomain":
            raise Invalid("rdomain is not supported on Linux")

    def vm(self, tree: Tree[Token], file: str, base: Path | None) -> None:
        names = self._strings(tree)
        line = int(names[0].line or 0)
        ok = True
        if len(names) == 2:
            parent_name, name = str(names[0]), str(names[1])
        else:
            parent_name, name = None, str(names[0])
        st = _VmState(VmConf(name=name, line=line, file=file, instance_of=parent_name))
        before = len(self.diags)
        if len(name) > VM_NAME_MAX or _VM_NAME.fullmatch(name) is None:
            self.error(file, line, f"invalid vm name: {name}")
        for opt in tree.children:
            if isinstance(opt, Tree) and opt.data != "string":
                try:
                    self._vm_opt(st, opt, file, base)
                except Invalid as exc:
                    self.error(file, self._line(opt), str(exc))
        self._finish_nics(st, file)
        parent = None
        if parent_name is not None:
            parent = self.config.vms.get(parent_name)
            if parent is None:
                self.error(file, line, f'vm "{name}": instance of unknown vm "{parent_name}"')
        prev = self.config.vms.get(name)
        if prev is not None:
            self.error(
                file, line, f'vm "{name}" defined more than once (first at {prev.file}:{prev.line})'
            )
            ok = False
        if ok and len(self.diags) == before:
            if parent is not None:
                _inherit(st, parent)
            self._register_nics(st, file)
            self.config.vms[name] = st.vm

    def _vm_opt(self, st: _VmState, opt: Tree[Token], file: str, base: Path | None) -> None:
        vm, kind = st.vm, opt.data
        args = self._strings(opt)
        value = str(args[0]) if args else ""
        single = {
            "memory",
            "boot",
            "initrd",
            "cmdline",
            "cdrom",
            "boot_device",
            "owner",
            "interfaces",
        }
        if kind in single:
            if kind in st.explicit:
                raise Invalid(f"{kind.replace('_', ' ')} specified more than once")
            st.explicit.add(kind)
        if kind == "enable":
            vm.enabled = True
        elif kind == "disable":
            vm.enabled = False
        elif kind == "memory":
            vm.memory_bytes = _memory(value)
        elif kind == "boot":
            vm.kernel = _nonempty(self._path(value, base), "boot")
        elif kind == "initrd":
            vm.initrd = _nonempty(self._path(value, base), "initrd")
        elif kind == "cmdline":
            vm.cmdline = value
        elif kind == "cdrom":
            vm.cdrom = _nonempty(self._path(value, base), "cdrom")
        elif kind == "boot_device":
            dev = opt.children[-1]
            assert isinstance(dev, Token)
            vm.boot_device = _BOOT_DEVICES[str(dev)]
        elif kind == "disk":
            self._disk(vm, opt, args, base)
        elif kind == "nic":
            st.nics.append(self._nic(opt, file, vm.name))
            if len(st.nics) > MAX_NICS:
                raise Invalid(f"too many interfaces: {len(st.nics)} (maximum {MAX_NICS})")
        elif kind == "interfaces":
            count = int(str(opt.children[-1]))
            if not 0 <= count <= MAX_NICS:
                raise Invalid(f"invalid number of interfaces: {count} (maximum {MAX_NICS})")
            st.interfaces_n, st.interfaces_line = count, self._line(opt)
        elif kind == "owner":
            owner = parse_owner(value)
            vm.owner_user, vm.owner_group = owner.user, owner.group
        elif kind == "allow":
            self._allow(vm, opt)

    def _disk(self, vm: VmConf, opt: Tree[Token], args: list[Token], base: Path | None) -> None:
        path = _nonempty(self._path(str(args[0]), base), "disk")
        fmt: str | None = None
        if len(args) > 1:
            fmt = str(args[1]).lower()
            if fmt not in ("raw", "qcow2"):
                raise Invalid(f"unrecognized disk format: {args[1]}")
        if any(d.path == path for d in vm.disks):
            raise Invalid(f"disk {path} specified more than once")
        vm.disks.append(
            DiskConf(path, "qcow2" if fmt == "qcow2" else "raw" if fmt else None, self._line(opt))
        )
        if len(vm.disks) > MAX_DISKS:
            raise Invalid(f"too many disks: {len(vm.disks)} (maximum {MAX_DISKS})")

    def _nic(self, opt: Tree[Token], file: str, vm_name: str) -> NicConf:
        nic = NicConf(local=self._tok(opt, "LOCAL") is not None, line=self._line(opt))
        args = self._strings(opt)
        if args:
            name = str(args[0])
            nic.tap_name = None if name == "tap" else check_ifname(name, "interface name")
        opts = [t for t in opt.children if isinstance(t, Tree) and t.data == "nic_opts"]
        for sub in opts[0].children if opts else []:
            if isinstance(sub, Tree):
                try:
                    self._nic_opt(nic, sub)
                except Invalid as exc:
                    self.error(file, self._line(sub), str(exc))
        if nic.local and nic.switch is not None:
            raise Invalid("a local interface cannot be attached to a switch")
        if nic.switch is not None:
            self.switch_refs.append((file, vm_name, nic.line, nic.switch))
        return nic

    def _nic_opt(self, nic: NicConf, sub: Tree[Token]) -> None:
        args = self._strings(sub)
        value = str(args[0]) if args else ""
        if sub.data == "nic_switch":
            nic.switch = value
        elif sub.data == "group":
            nic.group = check_group(value)
        elif sub.data == "lladdr":
            nic.locked_lladdr = self._tok(sub, "LOCKED") is not None
            nic.lladdr = parse_mac(value) if args else None
        elif sub.data in ("up", "down"):
            nic.up = sub.data == "up"
        elif sub.data == "offload":
            if value not in _OFFLOADS:
                raise Invalid(f"invalid offload: {value} (expected all, csum or none)")
            nic.offload = _OFFLOADS[value]
        elif sub.data == "poll":
            nic.poll_us = parse_poll(value)
        elif sub.data == "rdomain":
            raise Invalid("rdomain is not supported on Linux")

    def _allow(self, vm: VmConf, opt: Tree[Token]) -> None:
        flags = opt.children[-1]
        assert isinstance(flags, Tree)
        for flag in flags.children:
            if not isinstance(flag, Tree):
                continue
            if flag.data == "allow_owner":
                owner = parse_owner(str(self._strings(flag)[0]))
                vm.instance_owner_user, vm.instance_owner_group = owner.user, owner.group
                vm.allow_instance.add("owner")
            else:
                kw = flag.children[0]
                assert isinstance(kw, Token)
                vm.allow_instance.add(str(kw))

    def _finish_nics(self, st: _VmState, file: str) -> None:
        if st.interfaces_n is not None and st.nics and st.interfaces_n < len(st.nics):
            self.error(
                file,
                st.interfaces_line,
                f"interfaces {st.interfaces_n} conflicts with {len(st.nics)} interface statements",
            )
        if st.nics or st.interfaces_n is not None:
            st.explicit.add("nics")
        st.vm.interfaces = list(st.nics[:MAX_NICS])
        while st.interfaces_n is not None and len(st.vm.interfaces) < st.interfaces_n:
            st.vm.interfaces.append(NicConf(line=st.interfaces_line))

    def _register_nics(self, st: _VmState, file: str) -> None:
        """Tap names and MACs must be unique across all VMs."""
        for nic in st.vm.interfaces:
            if nic.tap_name is not None:
                prev = self.taps.get(nic.tap_name)
                if prev is not None:
                    self.error(
                        file, nic.line, f"interface {nic.tap_name} already used by vm {prev[0]}"
                    )
                self.taps[nic.tap_name] = (st.vm.name, nic.line)
            if nic.lladdr is not None:
                owner = self.macs.get(nic.lladdr)
                if owner is not None:
                    self.error(file, nic.line, f"lladdr {nic.lladdr} already used by vm {owner}")
                self.macs[nic.lladdr] = st.vm.name

    def finish(self) -> Config:
        """Checks that need the whole file (switches may be declared after use)."""
        for file, vm_name, line, switch in self.switch_refs:
            if switch not in self.config.switches:
                self.error(file, line, f'vm "{vm_name}": unknown switch "{switch}"')
        return self.config


def _inherit(st: _VmState, parent: VmConf) -> None:
    """An instance takes its parent's settings except disks, NIC names and MACs."""
    vm = st.vm
    for key, attr in (
        ("memory", "memory_bytes"),
        ("boot", "kernel"),
        ("initrd", "initrd"),
        ("cmdline", "cmdline"),
        ("cdrom", "cdrom"),
        ("boot_device", "boot_device"),
    ):
        if key not in st.explicit:
            setattr(vm, attr, getattr(parent, attr))
    if "owner" not in st.explicit:
        vm.owner_user, vm.owner_group = parent.owner_user, parent.owner_group
    if "nics" not in st.explicit:
        vm.interfaces = [replace(n, tap_name=None, lladdr=None) for n in parent.interfaces]


def _nonempty(value: str, what: str) -> str:
    if not value:
        raise Invalid(f"{what} path must not be empty")
    return value


def _memory(text: str) -> int:
    size = parse_size(text)
    if size < MIN_MEMORY:
        raise Invalid(f"memory too small: {text} (minimum 1M)")
    if size > MAX_MEMORY:
        raise Invalid(f"memory too large: {text} (maximum {MAX_MEMORY // (1024 * MIB)}G)")
    return size // MIB * MIB  # vmd rounds down to whole megabytes


def _prefix4(text: str) -> IPv4Network:
    try:
        net = ip_network(text, strict=True)
    except ValueError:
        raise Invalid(f"invalid local prefix: {text}") from None
    if "/" not in text or not isinstance(net, IPv4Network) or net.prefixlen > 31:
        raise Invalid(f"invalid local prefix: {text}")
    return net


def _prefix6(text: str) -> IPv6Network:
    try:
        net = ip_network(text, strict=True)
    except ValueError:
        raise Invalid(f"invalid local inet6 prefix: {text}") from None
    if "/" not in text or not isinstance(net, IPv6Network) or net.prefixlen > 64:
        raise Invalid(f"invalid local inet6 prefix: {text}")
    return net
