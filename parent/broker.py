"""The TUNSCAP broker's policy: which offload mask a worker may have applied to its tap.

vionet may not call ioctl, so it asks the parent (OpenBSD's VIODEV_MSG_TUNSCAP). The parent
treats the request as hostile: the mask must be well formed for tun.c, justified by features the
worker says the guest acked, those features must be ones the worker was told to offer, and the
result must lie inside what the NIC's ``offload`` setting allows. Anything else is refused whole
(never half-applied) and the tap keeps the mask it had.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmd_py.virtio_defs import TUN_F_ALL, NetF, TunF, tun_mask_for

OFFLOAD_MODES = ("all", "csum", "none")


def allowed_mask(mode: str) -> int:
    """The tap bits an ``offload`` setting permits."""
    if mode == "all":
        return TUN_F_ALL
    if mode == "csum":
        return int(TunF.CSUM)
    if mode == "none":
        return 0
    raise ValueError(f"unknown offload mode {mode!r}")


def offered_features(mode: str) -> int:
    """The virtio-net feature bits vionet offers the guest under an ``offload`` setting."""
    # Ring features, whatever the offload setting: EVENT_IDX lets both sides suppress needless
    # kicks and interrupts, INDIRECT_DESC lets a guest post a frame in one ring slot.
    base = NetF.VERSION_1 | NetF.MRG_RXBUF | NetF.RING_EVENT_IDX | NetF.RING_INDIRECT_DESC
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}")
    if mode == "none":
        return int(base)
    csum = base | NetF.CSUM | NetF.GUEST_CSUM
    if mode == "csum":
        return int(csum)
    return int(
        csum | NetF.HOST_TSO4 | NetF.HOST_TSO6 | NetF.GUEST_TSO4 | NetF.GUEST_TSO6
        | NetF.HOST_ECN | NetF.GUEST_ECN
    )


class TunscapRefused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NicPolicy:
    offered: int  # features the worker was told to offer
    allowed: int  # TUN_F bits the NIC config permits


def decide(mask: int, features: int, policy: NicPolicy) -> int:
    """Return the mask to apply, or raise :class:`TunscapRefused`."""
    if mask & ~TUN_F_ALL:
        raise TunscapRefused("unknown_bits", f"mask {mask:#x} has bits outside {TUN_F_ALL:#x}")
    if features & ~policy.offered:
        raise TunscapRefused(
            "not_offered", f"features {features & ~policy.offered:#x} were never offered"
        )
    if mask & ~TunF.CSUM and not mask & TunF.CSUM:
        raise TunscapRefused("needs_csum", f"mask {mask:#x}: TSO/USO need CSUM")
    if mask & TunF.TSO_ECN and not mask & (TunF.TSO4 | TunF.TSO6):
        raise TunscapRefused("ecn_without_tso", f"mask {mask:#x}")
    uso = mask & (TunF.USO4 | TunF.USO6)
    if uso and uso != TunF.USO4 | TunF.USO6:
        # tun.c applies USO only with both bits and rejects either alone.
        raise TunscapRefused("uso_pair", f"mask {mask:#x}")
    unjustified = mask & ~tun_mask_for(features)
    if unjustified:
        raise TunscapRefused(
            "not_negotiated", f"bits {unjustified:#x} not justified by features {features:#x}"
        )
    if mask & ~policy.allowed:
        raise TunscapRefused(
            "not_allowed", f"bits {mask & ~policy.allowed:#x} exceed the NIC's offload setting"
        )
    return mask
