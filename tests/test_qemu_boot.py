"""Boot the default guest under QEMU for real (TCG here) and drive it."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from pyroute2 import IPRoute

from vmd_py.accel import probe_accel
from vmd_py.guest_image import GuestImage, ensure_guest_image
from vmd_py.qemu import (
    Console,
    NicBackend,
    QemuVm,
    Serial,
    console_listener,
    guest_cmdline,
    start_qemu,
)
from vmd_py.qmp import qmp_connect

pytestmark = pytest.mark.e2e

READY = b"vmd-guest: ready"
READY_TIMEOUT = 60.0
POWERDOWN_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return ensure_guest_image()


@dataclass
class Guest:
    vm: QemuVm
    proc: trio.Process
    console: Console
    boot_seconds: float


@asynccontextmanager
async def running_guest(tmp: Path, image: GuestImage, cmdline: str,
                        nics: Sequence[NicBackend] = (),
                        netns: str | None = None) -> AsyncIterator[Guest]:
    vm = QemuVm(name="e2e", memory_mb=256, vcpus=2, kernel=image.kernel, initrd=image.initrd,
                cmdline=cmdline, accel=probe_accel(), qmp_path=tmp / "qmp.sock",
                serial=Serial("socket", tmp / "console.sock", logfile=tmp / "console.log"),
                nics=nics)
    listener = await console_listener(tmp / "console.sock")
    t0 = time.monotonic()
    try:
        proc = await start_qemu(vm, stderr_path=tmp / "qemu.stderr",
                                netns=Path("/run/netns", netns) if netns else None)
    except BaseException:
        await listener.aclose()
        raise
    try:
        try:
            with trio.fail_after(10):
                stream = await listener.accept()
        finally:
            await listener.aclose()
        console = Console(stream)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(console.run)
            try:
                with trio.fail_after(READY_TIMEOUT):
                    await console.wait_for(READY)
            except (trio.TooSlowError, EOFError):
                pytest.fail(f"no {READY!r}; console:\n{console.text()}\nqemu stderr:\n"
                            f"{(tmp / 'qemu.stderr').read_text()}")
            guest = Guest(vm, proc, console, time.monotonic() - t0)
            print(f"boot-to-ready {guest.boot_seconds:.2f} s ({vm.accel})")
            yield guest
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(5):
                await proc.wait()


def test_boot_params_static_ip_qmp_powerdown(image: GuestImage, tmp_path: Path) -> None:
    assert probe_accel() == "tcg"  # PVM /dev/kvm on this machine

    cmdline = guest_cmdline(
        ip="10.0.2.15::10.0.2.2:255.255.255.0:vmdguest:eth0:off",
        module_params={"virtio_net": {"csum": 0, "gso": 0}})
    # A NIC with no netdev at all: eth0 exists, nothing can leave the guest.
    nic = NicBackend("none", "52:54:00:12:34:01", device_props={"mrg_rxbuf": False})

    async def main() -> None:
        async with running_guest(tmp_path, image, cmdline, [nic]) as g:
            assert g.boot_seconds < READY_TIMEOUT
            con = g.console
            with trio.fail_after(30):
                assert await con.run_command(
                    "cat /sys/module/virtio_net/parameters/csum") == "N"
                assert await con.run_command(
                    "cat /sys/module/virtio_net/parameters/gso") == "N"
                addr = await con.run_command("ip -4 addr show dev eth0")
                assert re.search(r"inet 10\.0\.2\.15/24 .*eth0", addr), addr
                assert "default via 10.0.2.2 dev eth0" in await con.run_command("ip route")
                assert await con.run_command("hostname") == "vmdguest"
                assert await con.run_command("cat /sys/class/net/eth0/address") == (
                    "52:54:00:12:34:01")
                # mrg_rxbuf=off on the device: feature bit 15 is not offered (MAC, 5, is).
                feats = await con.run_command("cat /sys/class/net/eth0/device/features")
                assert (feats[5], feats[15]) == ("1", "0"), feats
                procs = await con.run_command("ps")
                assert "iperf3 -s -D" in procs and "acpid" in procs

            async with qmp_connect(g.vm.qmp_path) as qmp:
                assert (await qmp.execute("query-status"))["status"] == "running"
                await qmp.execute("stop")
                assert (await qmp.execute("query-status"))["status"] == "paused"
                await qmp.execute("cont")
                assert (await qmp.execute("query-status"))["running"] is True
                t0 = time.monotonic()
                await qmp.execute("system_powerdown")
                with trio.fail_after(POWERDOWN_TIMEOUT):
                    ev = await qmp.wait_event("SHUTDOWN")
                    await g.proc.wait()
                print(f"powerdown-to-exit {time.monotonic() - t0:.2f} s")
                assert ev["data"]["reason"] == "guest-shutdown"
                assert g.proc.returncode == 0

    trio.run(main)


def _wait_link(ipr: IPRoute, ifname: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise AssertionError(f"{ifname} never appeared")


def test_static_ip_on_a_tap_in_a_private_netns(image: GuestImage, tmp_path: Path,
                                              in_netns: str) -> None:
    """QEMU's own virtio-net on a tap inside this test's netns: ip= works on the wire."""
    cmdline = guest_cmdline(ip="10.77.0.2::10.77.0.1:255.255.255.0::eth0:off")
    nic = NicBackend("tap", "52:54:00:12:34:02", ifname="vmdtap0", device_props={"csum": False})

    async def main() -> None:
        async with running_guest(tmp_path, image, cmdline, [nic], netns=in_netns) as g:
            with IPRoute() as ipr:
                idx = _wait_link(ipr, "vmdtap0")
                ipr.addr("add", index=idx, address="10.77.0.1", prefixlen=24)
                ipr.link("set", index=idx, state="up")
            with trio.fail_after(30):
                out = await g.console.run_command("ping -c 1 -W 5 10.77.0.1")
                assert "1 packets received" in out, out
                # csum=off on the device; the tap peer still gives GUEST_CSUM and MRG_RXBUF.
                feats = await g.console.run_command("cat /sys/class/net/eth0/device/features")
                assert (feats[0], feats[1], feats[15]) == ("0", "1", "1"), feats
                tx = await g.console.run_command("ethtool -k eth0 | grep tx-checksumming")
                assert tx.endswith("tx-checksumming: off"), tx
            # The guest's iperf3 server (and every library it loads) works. nsenter: trio
            # spawns from worker threads, which need not be in this thread's netns.
            iperf = await trio.run_process(
                ["nsenter", f"--net=/run/netns/{in_netns}", "--", "iperf3", "-c", "10.77.0.2",
                 "-t", "1", "-J", "--connect-timeout", "5000"], capture_stdout=True,
                stderr=subprocess.STDOUT, check=False)
            assert iperf.returncode == 0, iperf.stdout.decode()
            assert b'"bits_per_second"' in iperf.stdout
            async with qmp_connect(g.vm.qmp_path) as qmp:
                await qmp.execute("system_powerdown")
                with trio.fail_after(POWERDOWN_TIMEOUT):
                    await g.proc.wait()
            assert g.proc.returncode == 0

    trio.run(main)
