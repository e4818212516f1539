"""``vmctl start`` options: validated in the parent and turned into the VmConf to start.

Everything here comes from an unprivileged client, so every value is type- and range-checked,
every path must exist (and, for a non-root client, be accessible to that client: the parent
opens images as root), and every switch must be configured.
"""

from __future__ import annotations

import copy
import errno
import grp
import os
import pwd
import stat
from dataclasses import replace
from typing import Any

from vmd_py.config.model import (
    MAX_DISKS,
    MAX_MEMORY,
    MAX_NICS,
    MIN_MEMORY,
    Config,
    DiskConf,
    NicConf,
    VmConf,
)

KEYS = frozenset({"memory", "kernel", "boot_device", "disks", "cdrom", "interfaces",
                  "switches", "local", "template"})
# Which `allow instance` flag a non-root client needs to override each option.
ALLOW_FLAG = {"memory": "memory", "kernel": "boot", "boot_device": "boot", "disks": "disk",
              "cdrom": "cdrom", "interfaces": "interface", "switches": "interface",
              "local": "interface"}
MAX_PATH = 1024


class OptionError(Exception):
    """A refused start option (with an errno for vmctl)."""

    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.code = code


def _typed(options: dict[str, Any], key: str, kind: type) -> Any:
    value = options[key]
    # bool is an int subclass: a count or size must not be given as true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OptionError(f"start: {key}: expected {kind.__name__}")
    return value


def _may_access(st: os.stat_result, uid: int, gid: int, write: bool) -> bool:
    """Plain Unix permission check for uid/gid (root is not asked)."""
    want = 0o6 if write else 0o4
    if st.st_uid == uid:
        return (st.st_mode >> 6) & want == want
    groups = {gid}
    try:
        name = pwd.getpwuid(uid).pw_name
        groups |= {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    except KeyError:
        pass
    if st.st_gid in groups:
        return (st.st_mode >> 3) & want == want
    return st.st_mode & want == want


def check_path(path: Any, what: str, uid: int, gid: int, *, write: bool,
               block_ok: bool = True) -> str:
    """An absolute path to an existing regular file (or block device) the client may use."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH \
            or "\0" in path:
        raise OptionError(f"start: {what}: an absolute path is needed")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise OptionError(f"start: {what} {path}: {exc.strerror}", exc.errno or errno.ENOENT) \
            from None
    if not (stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode))):
        raise OptionError(f"start: {what} {path}: not a regular file")
    if uid != 0 and not _may_access(st, uid, gid, write):
        raise OptionError(f"start: {what} {path}: permission denied", errno.EPERM)
    return path


def parse_disk(value: Any, uid: int, gid: int) -> DiskConf:
    if not isinstance(value, dict) or set(value) - {"path", "format"}:
        raise OptionError("start: disk: expected {path, format}")
    fmt = value.get("format")
    if fmt not in (None, "raw", "qcow2"):
        raise OptionError(f"start: disk: unknown format {fmt!r}")
    return DiskConf(check_path(value.get("path"), "disk", uid, gid, write=True), fmt)


def _nics(options: dict[str, Any], config: Config) -> list[NicConf]:
    count = _typed(options, "interfaces", int) if "interfaces" in options else 0
    switches = _typed(options, "switches", list) if "switches" in options else []
    local = _typed(options, "local", bool) if "local" in options else False
    if not 0 <= count <= MAX_NICS:
        raise OptionError(f"start: invalid number of interfaces: {count} (maximum {MAX_NICS})")
    nics = [NicConf(local=True)] if local else []
    for sw in switches:
        if not isinstance(sw, str) or sw not in config.switches:
            raise OptionError(f"start: unknown switch {sw!r}", errno.ENOENT)
        nics.append(NicConf(switch=sw))
    while len(nics) < count:
        nics.append(NicConf())
    if len(nics) > MAX_NICS:
        raise OptionError(f"start: too many interfaces: {len(nics)} (maximum {MAX_NICS})")
    return nics


def _apply(conf: VmConf, options: dict[str, Any], config: Config, uid: int, gid: int) -> None:
    if "memory" in options:
        mem = _typed(options, "memory", int)
        if not MIN_MEMORY <= mem <= MAX_MEMORY:
            raise OptionError(f"start: memory size {mem} out of range (1M..128G)")
        conf.memory_bytes = mem - mem % (1024 * 1024)
    if "kernel" in options:
        conf.kernel = check_path(options["kernel"], "kernel", uid, gid, write=False,
                                 block_ok=False)
    if "boot_device" in options:
        dev = options["boot_device"]
        if dev not in ("disk", "cdrom", "net"):
            raise OptionError(f"start: unknown boot device {dev!r}")
        conf.boot_device = dev
    if "disks" in options:
        disks = [parse_disk(d, uid, gid) for d in _typed(options, "disks", list)]
        if len(disks) > MAX_DISKS:
            raise OptionError(f"start: too many disks: {len(disks)} (maximum {MAX_DISKS})")
        if len({d.path for d in disks}) != len(disks):
            raise OptionError("start: a disk is given more than once")
        conf.disks = disks
    if "cdrom" in options:
        conf.cdrom = check_path(options["cdrom"], "cdrom", uid, gid, write=False)
    if {"interfaces", "switches", "local"} & set(options):
        conf.interfaces = _nics(options, config)


def _in_group(group: str | None, uid: int, gid: int) -> bool:
    if group is None:
        return False
    try:
        g = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except KeyError:
        return False
    if g.gr_gid == gid:
        return True
    try:
        return pwd.getpwuid(uid).pw_name in g.gr_mem
    except KeyError:
        return False


def _uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    try:
        return int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def owns(user: str | None, group: str | None, uid: int, gid: int) -> bool:
    """Whether a client (uid, gid) is the owner ``user[:group]`` of a VM or instance."""
    return (user is not None and _uid_of(user) == uid) or _in_group(group, uid, gid)


def _check_instance(template: VmConf, options: dict[str, Any], uid: int, gid: int) -> None:
    """vmd's rule: a non-root client needs `allow instance` with an owner that matches it,
    and the template must allow every option the client overrides."""
    if uid == 0:
        return
    if not template.allow_instance or not owns(
            template.instance_owner_user, template.instance_owner_group, uid, gid):
        raise OptionError(f"vm {template.name}: no permission to create vm instance",
                          errno.EPERM)
    for key in options:
        flag = ALLOW_FLAG.get(key)
        if flag is not None and flag not in template.allow_instance:
            raise OptionError(f"vm {template.name}: no permission to set {flag}", errno.EPERM)


def instance_of(template: VmConf, name: str) -> VmConf:
    """A new VM inheriting the template's settings except disks, tap names and MACs."""
    return replace(
        template, name=name, disks=[], instance_of=template.name, allow_instance=set(),
        instance_owner_user=None, instance_owner_group=None,
        interfaces=[replace(n, tap_name=None, lladdr=None) for n in template.interfaces],
    )


def start_conf(config: Config, name: str, existing: VmConf | None, options: dict[str, Any],
               uid: int, gid: int) -> VmConf:
    """The configuration to start ``name`` with (raises OptionError).

    ``existing`` is the VM's current configuration (vm.conf or an earlier ad-hoc start), or
    None for a VM vmd has never heard of.
    """
    unknown = set(options) - KEYS
    if unknown:
        raise OptionError(f"start: unknown option {sorted(unknown)[0]!r}")
    settings = {k: v for k, v in options.items() if k != "template"}
    if "template" in options:
        tname = _typed(options, "template", str)
        template = config.vms.get(tname)
        if template is None:
            raise OptionError(f"start: template vm {tname!r} not found", errno.ENOENT)
        if existing is not None:
            raise OptionError(f"vm {name} already exists", errno.EEXIST)
        _check_instance(template, settings, uid, gid)
        conf = instance_of(template, name)
        if uid != 0:
            # The instance belongs to whoever created it.
            conf.owner_user, conf.owner_group = str(uid), None
    elif existing is not None:
        conf = copy.deepcopy(existing)
    else:
        if not settings:
            raise OptionError(f"{name}: unknown VM", errno.ENOENT)
        if uid != 0:
            raise OptionError(f"{name}: permission denied (only root creates VMs)",
                              errno.EPERM)
        conf = VmConf(name=name, file="vmctl")
    _apply(conf, settings, config, uid, gid)
    return conf
