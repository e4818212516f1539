"""``local interface``: a /31 per NIC from the local prefix, host side on the tap.

The allocation is vmd's (priv.c vm_priv_addr): VM id N gets the /24-sized block N of the prefix,
NIC i the /31 at offset 2(i+1) in it (skipping .0, so no gateway ends in .0); the even address
is the host's (the tap), the odd one the guest's, which vionet hands out by DHCP. It depends on
nothing but the prefix, the VM id and the NIC index, so it is the same on every start.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute

from vmd_py.config.model import Config, NicConf

PREFIXLEN = 31
MAX_NIC_INDEX = 0x7E  # (index + 1) * 2 must stay inside the VM's 256-address block


class LocalAddressError(ValueError):
    """The VM id or NIC index does not fit the local prefix."""


@dataclass(frozen=True)
class LocalAddrs:
    host: IPv4Address
    guest: IPv4Address


def allocate(prefix: IPv4Network, vm_id: int, index: int) -> LocalAddrs:
    """The /31 for NIC ``index`` of VM ``vm_id`` inside ``prefix``."""
    if vm_id < 0 or not 0 <= index <= MAX_NIC_INDEX:
        raise LocalAddressError(f"vm id {vm_id} interface {index}: out of range")
    offset = (vm_id << 8) | ((index + 1) * 2)
    if offset >= prefix.num_addresses:
        raise LocalAddressError(
            f"vm id {vm_id} interface {index}: beyond local prefix {prefix}"
        )
    host = prefix.network_address + offset
    return LocalAddrs(host=host, guest=host + 1)


def local_addrs_for(config: Config, nic: NicConf, vm_id: int, index: int) -> LocalAddrs | None:
    """The NIC's /31 if it is a local interface, else None."""
    return allocate(config.local_prefix, vm_id, index) if nic.local else None


def assign_host_address(tap: str, addrs: LocalAddrs) -> None:
    """Put the host side of the /31 on the tap (it goes away with the tap)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=tap)
        if not found:
            raise LocalAddressError(f"no interface {tap}")
        # The tap is always freshly created (IFF_TUN_EXCL), so it holds no other address.
        ipr.addr("add", index=found[0], address=str(addrs.host), prefixlen=PREFIXLEN)
