"""Tap devices: opened, configured and owned by the privileged parent only.

The tap carries ``virtio_net_hdr`` (IFF_VNET_HDR) so the guest's offload metadata crosses the host
untouched: the 12-byte, little-endian form that VERSION_1 guests use. Offloads start at 0 and
change only through :meth:`Tap.set_offload`, which the TUNSCAP broker calls.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from pyroute2.ethtool import Ethtool

from vmd_py.virtio_defs import VNET_HDR_LEN, TunF

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFNAMSIZ = 16

# ethtool feature names (ETH_SS_FEATURES) that each TUN_F bit turns on in tun.c set_offload().
_FEATURE_OF_TUNF = {
    TunF.CSUM: "tx-checksum-ip-generic",
    TunF.TSO4: "tx-tcp-segmentation",
    TunF.TSO6: "tx-tcp6-segmentation",
    TunF.TSO_ECN: "tx-tcp-ecn-segmentation",
}
_USO_FEATURE = "tx-udp-segmentation"  # tun sets it only for USO4 and USO6 together


class TapError(OSError):
    pass


@dataclass
class Tap:
    """An attached tap fd. ``fd`` stays with the parent; workers get a dup of it."""

    name: str
    fd: int
    offload: int = 0

    @classmethod
    def open(cls, name: str) -> Tap:
        """Create (or attach to) tap ``name`` with a 12-byte LE vnet header and no offloads.

        IFF_TUN_EXCL makes the open fail if another owner already created a device by that name,
        so a name collision never hands us someone else's device.
        """
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise TapError(f"bad tap name {name!r}")
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                              | IFF_TUN_EXCL)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
            actual = res[:IFNAMSIZ].rstrip(b"\0").decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
            tap = cls(actual, fd)
            tap.set_offload(0)
        except BaseException:
            os.close(fd)
            raise
        return tap

    def set_offload(self, mask: int) -> None:
        """TUNSETOFFLOAD; the kernel refuses unknown bits and TSO without CSUM with EINVAL."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, mask)
        self.offload = mask

    def read_offload(self) -> int:
        """The mask in force, read back from the kernel (ethtool features), not our record."""
        with Ethtool() as eth:
            feats = eth.get_features(self.name)
        active = {f.name for f in feats.features.values() if f.enable}
        mask = 0
        for bit, fname in _FEATURE_OF_TUNF.items():
            if fname in active:
                mask |= bit
        if _USO_FEATURE in active:
            mask |= TunF.USO4 | TunF.USO6
        return mask

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
