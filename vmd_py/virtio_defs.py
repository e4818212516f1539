"""Shared virtio-net and tun definitions (virtio 1.2 spec 5.1; linux/virtio_net.h; if_tun.h).

Plain numbers both sides agree on; no behaviour here.
"""

from __future__ import annotations

import enum


class NetF(enum.IntFlag):
    """virtio-net feature bits (virtio 1.2, 5.1.3) and the transport bits we use."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    # vhost-user: the backend speaks VHOST_USER_GET/SET_PROTOCOL_FEATURES.
    PROTOCOL_FEATURES = 1 << 30


def flag_names(value: int, flags: type[enum.IntFlag]) -> list[str]:
    """Names of the set bits of ``value`` that ``flags`` knows, in bit order."""
    return [f.name for f in flags if f.name and value & f.value]


class VnetHdrFlags(enum.IntFlag):
    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class VnetGso(enum.IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80  # a flag OR-ed into the type


VNET_HDR_LEN = 12  # with num_buffers: VERSION_1 or MRG_RXBUF


class TunF(enum.IntFlag):
    """TUNSETOFFLOAD bits (linux/if_tun.h): what the kernel may hand the tap's reader."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10
    USO4 = 0x20
    USO6 = 0x40


TUN_F_ALL = int(TunF.CSUM | TunF.TSO4 | TunF.TSO6 | TunF.TSO_ECN | TunF.USO4 | TunF.USO6)

# Which guest feature justifies each tap offload bit: the tap may hand vionet a frame of a kind
# only if the guest can take it as is.
TUNF_REQUIRES: dict[TunF, NetF] = {
    TunF.CSUM: NetF.GUEST_CSUM,
    TunF.TSO4: NetF.GUEST_TSO4,
    TunF.TSO6: NetF.GUEST_TSO6,
    TunF.TSO_ECN: NetF.GUEST_ECN,
    TunF.UFO: NetF.GUEST_UFO,
    TunF.USO4: NetF.GUEST_USO4,
    TunF.USO6: NetF.GUEST_USO6,
}


def tun_mask_for(acked: int) -> int:
    """The tap offload mask a guest with these acked features can take (CSUM gates the rest)."""
    if not acked & NetF.GUEST_CSUM:
        return 0
    mask = 0
    for bit, needs in TUNF_REQUIRES.items():
        if acked & needs:
            mask |= bit
    return mask
