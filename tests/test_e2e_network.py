"""vm.conf networking options with real guests: ``locked lladdr`` and ``local interface``."""

from __future__ import annotations

import re
import socket
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from parent.local import allocate
from tests.vmd_harness import HarnessError, Vmd, wait_for

pytestmark = pytest.mark.e2e

MAC_A = "fe:e1:ba:d0:00:0a"
MAC_B = "fe:e1:ba:d0:00:0b"
IP_A = "10.77.0.11"
IP_B = "10.77.0.12"
SPOOFED = "02:00:00:00:00:99"
ETH_P_ALL = 0x0003


def locked_conf() -> str:
    def vm(name: str, ip: str, mac: str) -> str:
        return f"""
vm "{name}" {{
	memory 256M
	cmdline "console=ttyS0 quiet panic=-1 ip={ip}:::255.255.255.0::eth0:off"
	interface {{
		switch "sw"
		lladdr {mac}
	}}
}}
"""
    return ('switch "sw" {\n\tinterface vmdbr0\n\tlocked lladdr\n}\n'
            + vm("lock-a", IP_A, MAC_A) + vm("lock-b", IP_B, MAC_B))


def nic_counters(vmd: Vmd, name: str) -> dict[str, int]:
    counters: dict[str, int] = vmd.status(name)["nics"][0]["counters"]
    return counters


def flood_unknown_unicast(bridge: str, count: int = 5) -> None:
    """Frames from the host to a MAC no port has: the bridge floods them to every tap."""
    frame = bytes.fromhex("02aabbccddee") + bytes.fromhex("020000000001") + b"\x88\xb5" \
        + bytes(46)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((bridge, 0))
        for _ in range(count):
            s.send(frame)


def test_locked_lladdr_drops_spoofed_source(in_netns: str, tmp_path: Path,
                                            qemu_binary: str) -> None:
    with Vmd(tmp_path, locked_conf()) as vmd:
        a = vmd.wait_ready("lock-a")
        b = vmd.wait_ready("lock-b")
        nic = vmd.status("lock-a")["nics"][0]
        assert nic["locked"] is True and nic["lladdr"] == MAC_A
        # Unspoofed, the two guests talk.
        assert "0% packet loss" in a.run(f"ping -c 3 -W 2 {IP_B}")
        assert nic_counters(vmd, "lock-a").get("tx_drop_bad_source_address", 0) == 0

        # Guest A takes another MAC: every frame it sends now is dropped by its vionet.
        a.run(f"ip link set eth0 down; ip link set eth0 address {SPOOFED}; ip link set eth0 up")
        out = a.run(f"ping -c 3 -W 2 {IP_B}", check=False)
        assert "100% packet loss" in out, out
        dropped = nic_counters(vmd, "lock-a").get("tx_drop_bad_source_address", 0)
        assert dropped > 0
        assert "bad source address" in vmd.log.read_text()

        # RX side: B's vionet passes only frames for B's MAC (and broadcast/multicast).
        before = nic_counters(vmd, "lock-b").get("rx_drop_locked_destination", 0)
        flood_unknown_unicast("vmdbr0")
        wait_for(lambda: nic_counters(vmd, "lock-b").get("rx_drop_locked_destination", 0)
                 >= before + 5, 10, "B to drop frames for another MAC")

        # Back to its own MAC, A reaches B again: the filter is exact, not sticky.
        a.run(f"ip link set eth0 down; ip link set eth0 address {MAC_A}; ip link set eth0 up")
        assert "0% packet loss" in a.run(f"ping -c 3 -W 2 {IP_B}")
        assert "0% packet loss" in b.run(f"ping -c 2 -W 2 {IP_A}")


LOCAL_CONF = """
vm "loc" {
	memory 256M
	cmdline "console=ttyS0 quiet panic=-1 ip=dhcp"
	local interface
}
"""


def test_local_interface_dhcp(in_netns: str, tmp_path: Path, qemu_binary: str) -> None:
    with Vmd(tmp_path, LOCAL_CONF) as vmd:
        con = vmd.wait_ready("loc")
        status = vmd.status("loc")
        addrs = allocate(IPv4Network("100.64.0.0/10"), status["id"], 0)
        log = vmd.console_log("loc")
        m = re.search(r"vmd-guest: dhcp eth0 (100\.64\.\d+\.\d+)/(\d+)", log)
        if m is None:
            raise HarnessError(f"no DHCP lease in the console log:\n{log[-3000:]}")
        assert (m.group(1), m.group(2)) == (str(addrs.guest), "31")

        nic = status["nics"][0]
        assert nic["switch"] is None
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=nic["tap"])[0]
            on_tap = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                      for a in ipr.get_addr(index=idx, family=socket.AF_INET)}
        assert on_tap == {(str(addrs.host), 31)}

        assert "0% packet loss" in con.run(f"ping -c 3 -W 2 {addrs.host}")
        route = con.run("ip route show default")
        assert f"via {addrs.host}" in route, route
        host_ping = subprocess.run(["ping", "-c", "2", "-W", "2", str(addrs.guest)],
                                   capture_output=True, text=True, timeout=30)
        assert host_ping.returncode == 0, host_ping.stdout + host_ping.stderr

        counters = nic["counters"]
        assert counters.get("dhcp_offers", 0) >= 1 and counters.get("dhcp_acks", 0) >= 1
        assert counters.get("rx_injected", 0) >= 2
        assert not {k: v for k, v in counters.items() if k.startswith("dhcp_drop") and v}
