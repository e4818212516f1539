"""Choose QEMU's accelerator: KVM only where it runs stock guest kernels."""

from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path
from typing import Literal

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
Accel = Literal["kvm", "tcg"]


def kvm_status(dev: Path = Path("/dev/kvm"),
               sys_module: Path = Path("/sys/module")) -> tuple[Accel, str]:
    """The accelerator to use and why.

    PVM (kvm_pvm) exposes /dev/kvm but only runs PVM-enlightened kernels; a stock
    guest crawls through the instruction emulator and dies, so it means TCG. Stock
    KVM needs hardware virtualisation, i.e. kvm_intel or kvm_amd.
    """
    if not dev.exists():
        return "tcg", f"{dev} does not exist"
    if (sys_module / "kvm_pvm").exists():
        return "tcg", "/dev/kvm is PVM (kvm_pvm), which cannot run stock guests"
    if not any((sys_module / m).exists() for m in ("kvm_intel", "kvm_amd")):
        return "tcg", "neither kvm_intel nor kvm_amd is loaded"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return "tcg", f"cannot open {dev}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return "tcg", f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return "tcg", f"KVM API version {version}, want {KVM_API_VERSION}"
    return "kvm", "stock KVM"


@functools.cache
def probe_accel() -> Accel:
    """"kvm" or "tcg" for this host (cached); VMD_ACCEL=kvm|tcg overrides the probe."""
    forced = os.environ.get("VMD_ACCEL", "")
    if forced == "kvm":
        return "kvm"
    if forced == "tcg":
        return "tcg"
    return kvm_status()[0]
