"""The parsed form of vm.conf: plain dataclasses, no behaviour beyond lookups."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

Offload = Literal["all", "csum", "none"]
BootDevice = Literal["disk", "cdrom", "net"]
DiskFormat = Literal["raw", "qcow2"]

MIB = 1024 * 1024
DEFAULT_MEMORY = 512 * MIB
# vionet's busy-poll window after traffic: long enough to catch a request's answer without a
# wake-up, short enough that an idle NIC costs no CPU. vionet.datapath has the same default.
DEFAULT_POLL_US = 1000
MAX_POLL_US = 1_000_000
MIN_MEMORY = MIB
MAX_MEMORY = 128 * 1024 * MIB
MAX_DISKS = 4
MAX_NICS = 4
DEFAULT_LOCAL_PREFIX = IPv4Network("100.64.0.0/10")
DEFAULT_STAGGERED_DELAY = 30


@dataclass(frozen=True)
class Owner:
    """A user and/or group as written (names or numeric ids); None = not given."""

    user: str | None
    group: str | None


@dataclass
class SwitchConf:
    """``switch "name" { ... }``: a Linux bridge the VMs' taps are enslaved to."""

    name: str
    ifname: str
    group: str | None = None
    locked_lladdr: bool = False
    up: bool = True
    enabled: bool = True
    line: int = 0
    file: str = ""


@dataclass
class DiskConf:
    """``disk "path" [format raw|qcow2]``; format None = detect from the image."""

    path: str
    format: DiskFormat | None = None
    line: int = 0


@dataclass
class NicConf:
    """One ``[local] interface`` of a VM (or a default one from ``interfaces N``)."""

    tap_name: str | None = None
    switch: str | None = None
    group: str | None = None
    locked_lladdr: bool = False
    lladdr: str | None = None
    up: bool = True
    local: bool = False
    offload: Offload = "all"
    # How long vionet busy-polls after traffic before it sleeps again (microseconds).
    poll_us: int = DEFAULT_POLL_US
    line: int = 0


@dataclass
class VmConf:
    """``vm "name" { ... }`` or ``vm "parent" instance "name" { ... }``."""

    name: str
    enabled: bool = True
    memory_bytes: int = DEFAULT_MEMORY
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    boot_device: BootDevice | None = None
    cdrom: str | None = None
    disks: list[DiskConf] = field(default_factory=list)
    interfaces: list[NicConf] = field(default_factory=list)
    owner_user: str | None = None
    owner_group: str | None = None
    instance_of: str | None = None
    allow_instance: set[str] = field(default_factory=set)
    instance_owner_user: str | None = None
    instance_owner_group: str | None = None
    line: int = 0
    file: str = ""


@dataclass
class Config:
    """A whole, valid configuration (the parser never returns a partial one)."""

    macros: dict[str, str] = field(default_factory=dict)
    local_prefix: IPv4Network = DEFAULT_LOCAL_PREFIX
    local_inet6: bool = False
    local_prefix6: IPv6Network | None = None
    socket_owner: Owner = field(default_factory=lambda: Owner("root", "root"))
    staggered_start: bool = False
    staggered_parallel: int | None = None
    staggered_delay: int = DEFAULT_STAGGERED_DELAY
    switches: dict[str, SwitchConf] = field(default_factory=dict)
    vms: dict[str, VmConf] = field(default_factory=dict)

    def nic_switch(self, nic: NicConf) -> SwitchConf | None:
        """The switch a NIC is attached to, if any."""
        return self.switches.get(nic.switch) if nic.switch is not None else None

    def nic_locked(self, nic: NicConf) -> bool:
        """Effective ``locked lladdr``: set on the NIC or inherited from its switch."""
        sw = self.nic_switch(nic)
        return nic.locked_lladdr or (sw is not None and sw.locked_lladdr)
