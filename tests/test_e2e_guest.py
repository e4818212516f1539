"""A real guest behind vionet: boot, ping, TCP both ways, with and without offloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyroute2 import IPRoute

from bench.iperf_client import run_iperf3
from tests.vmd_harness import Vmd, retransmits

pytestmark = pytest.mark.e2e

HOST = "10.77.0.1"


def conf(name: str, guest_ip: str, *, offload: str = "all", cmdline_extra: str = "",
         mac: str = "fe:e1:ba:d0:00:02", poll: str = "") -> str:
    poll_opt = f", poll {poll}" if poll else ""
    return f"""
switch "sw" {{
	interface vmdbr0
}}
vm "{name}" {{
	memory 256M
	cmdline "console=ttyS0 quiet panic=-1 {ip_arg(guest_ip)}{cmdline_extra}"
	interface {{
		switch "sw"
		lladdr {mac}
		offload {offload}{poll_opt}
	}}
}}
"""


def ip_arg(guest_ip: str) -> str:
    return f"ip={guest_ip}::{HOST}:255.255.255.0::eth0:off"


def host_address(bridge: str = "vmdbr0", addr: str = HOST) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)[0]
        ipr.addr("add", index=idx, address=addr, prefixlen=24)


@pytest.mark.parametrize(
    ("offload", "extra", "want_acked", "want_tap", "poll", "poll_us"),
    [
        ("all", "", {"CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4"}, {"CSUM", "TSO4", "TSO6"},
         "", 1000),
        # A guest driver told not to use checksum/GSO offload for what it sends
        # (virtio_net.csum=0 gso=0 only change its netdev features; it still negotiates).
        # ... and with vionet's busy-polling off: it sleeps between every frame.
        ("all", " virtio_net.csum=0 virtio_net.gso=0", {"GUEST_CSUM"}, {"CSUM"}, "off", 0),
        # No offload negotiated at all: vionet offers nothing beyond VERSION_1 and MRG_RXBUF,
        # so the guest acks no CSUM/GSO bit, exactly as a guest without offload support.
        ("none", "", set(), set(), "20ms", 20_000),
    ],
    ids=["offload", "guest-csum-off", "offload-none"],
)
def test_guest_host_ping_and_tcp(in_netns: str, tmp_path: Path, qemu_binary: str,
                                 offload: str, extra: str, want_acked: set[str],
                                 want_tap: set[str], poll: str, poll_us: int) -> None:
    name = f"g-{offload}-{len(extra)}"
    with Vmd(tmp_path, conf(name, "10.77.0.2", offload=offload, cmdline_extra=extra,
                            poll=poll)) as vmd:
        con = vmd.wait_ready(name)
        host_address()
        assert "0% packet loss" in con.run(f"ping -c 3 -W 2 {HOST}")
        nic = vmd.status(name)["nics"][0]
        acked = set(nic["features_acked"])
        assert want_acked <= acked, acked
        if not want_acked:
            assert not acked & {"CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6"}, acked
        assert set(nic["tap_offload"]) >= want_tap
        if not want_tap:
            assert nic["tap_offload"] == []
        # vm.conf's poll reaches the worker that runs the data path.
        assert nic["poll_us"] == poll_us
        argv = Path(f"/proc/{nic['vionet_pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--poll-us") + 1] == str(poll_us).encode()
        for reverse in (False, True):
            result = run_iperf3("10.77.0.2", seconds=3, reverse=reverse)
            assert result["end"]["sum_received"]["bytes"] > 10_000_000
            assert retransmits(result) < 50
        counters = vmd.status(name)["nics"][0]["counters"]
        assert counters["rx_packets"] > 1000 and counters["tx_packets"] > 1000
        assert not {k: v for k, v in counters.items() if "drop" in k and v}, counters
        assert "virtio_net" not in vmd.console_log(name) or "not a head" not in \
            vmd.console_log(name)
        vmd.vmctl("stop", "-w", name)
        assert vmd.status(name)["state"] == "stopped"
