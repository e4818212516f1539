"""Sustained TCP load through vionet, and the offload mask across a guest device reset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.iperf_client import run_iperf3
from tests.test_e2e_guest import conf, host_address
from tests.vmd_harness import Vmd, wait_for

pytestmark = pytest.mark.e2e

GUEST_ERRORS = re.compile(r"virtio_net|virtio0|not a head|NETDEV WATCHDOG|BUG|Oops")


@pytest.mark.parametrize("reverse", [False, True], ids=["host-to-guest", "guest-to-host"])
def test_sixty_seconds_of_tcp_without_errors_or_stalls(
    in_netns: str, tmp_path: Path, qemu_binary: str, reverse: bool
) -> None:
    name = f"load-{'r' if reverse else 'f'}"
    with Vmd(tmp_path, conf(name, "10.77.0.2")) as vmd:
        vmd.wait_ready(name)
        host_address()
        result = run_iperf3("10.77.0.2", seconds=60, reverse=reverse, extra=("-i", "1"))
        intervals = [iv["sum"]["bits_per_second"] for iv in result["intervals"]]
        assert len(intervals) >= 59
        # No stall: every second moved data, none fell below a tenth of the median.
        median = sorted(intervals)[len(intervals) // 2]
        assert median > 1e8, intervals
        assert min(intervals) > median / 10, intervals
        assert not GUEST_ERRORS.search(vmd.console_log(name)), vmd.console_log(name)
        counters = vmd.status(name)["nics"][0]["counters"]
        assert not {k: v for k, v in counters.items() if ("drop" in k or "error" in k) and v}
        vmd.vmctl("stop", "-w", name)


def test_offload_mask_follows_negotiation_and_device_reset(
    in_netns: str, tmp_path: Path, qemu_binary: str
) -> None:
    name = "reset"
    with Vmd(tmp_path, conf(name, "10.77.0.2")) as vmd:
        con = vmd.wait_ready(name)
        nic = vmd.status(name)["nics"][0]
        assert {"GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6"} <= set(nic["features_acked"])
        assert set(nic["tap_offload"]) == {"CSUM", "TSO4", "TSO6", "TSO_ECN"}
        # The guest resets the device: unbinding the driver resets it, QEMU stops the rings.
        con.run("echo virtio0 > /sys/bus/virtio/drivers/virtio_net/unbind")
        wait_for(lambda: vmd.status(name)["nics"][0]["tap_offload"] == [], 20,
                 "offloads back to 0 after the device reset")
        # Bound again, the driver renegotiates and the offloads come back.
        con.run("echo virtio0 > /sys/bus/virtio/drivers/virtio_net/bind")
        wait_for(lambda: set(vmd.status(name)["nics"][0]["tap_offload"]) ==
                 {"CSUM", "TSO4", "TSO6", "TSO_ECN"}, 20, "offloads renegotiated")
        con.run("ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0")
        host_address()
        assert "0% packet loss" in con.run("ping -c 2 -W 2 10.77.0.1")
        vmd.vmctl("stop", "-w", name)
