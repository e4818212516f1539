from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests import netns


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (taps, namespaces, sandboxed workers)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")


@pytest.fixture
def root() -> None:
    _need_root()


@pytest.fixture
def in_netns() -> Iterator[str]:
    """Run the test inside a fresh network namespace that is deleted afterwards."""
    _need_root()
    with netns.entered() as name:
        yield name


@pytest.fixture
def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("needs qemu-system-x86_64 (make test installs it)")
    return path
