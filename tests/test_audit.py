"""Privilege audit against a live parent with a live, sandboxed vionet worker."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import trio

from imsg.catalogue import MsgType
from imsg.codec import Imsg
from parent.supervisor import NicSpec, Parent
from tests.test_sandbox import ALLOWED, FORBIDDEN

pytestmark = pytest.mark.audit

ETH_P_ALL = 0x0003


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def fd_kinds(pid: int) -> list[str]:
    """Each open fd of ``pid`` reduced to its kind (a path, or socket/eventpoll/...)."""
    kinds = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:"):
            target = "socket"
        elif target.startswith("pipe:"):
            target = "pipe"
        kinds.append(target)
    return sorted(kinds)


def assert_sandboxed(pid: int) -> None:
    status = proc_status(pid)
    uids = status["Uid"].split()
    assert all(u != "0" for u in uids), status["Uid"]
    assert all(g != "0" for g in status["Gid"].split()), status["Gid"]
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    for ns in ("net", "mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def inject_frame(ifname: str) -> None:
    """Transmit one broadcast frame on the tap, i.e. toward its reader (the worker)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
        s.bind((ifname, 0))
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06" + bytes(46)
        s.send(frame)


def test_live_worker_is_sandboxed_and_probes_fail(in_netns: str) -> None:
    async def main() -> None:
        parent = Parent()
        with tempfile.TemporaryDirectory() as runtime:
            async with trio.open_nursery() as nursery:
                await nursery.start(parent.run)
                nic = await parent.add_nic(
                    NicSpec("a0", "vtapa0", switch="vmdbr-a", vhost_path=f"{runtime}/a0.sock")
                )
                pid = nic.pid
                assert pid is not None
                assert_sandboxed(pid)
                # Exactly: stdin/stdout (/dev/null), the stderr pipe, the tap, the imsg socket,
                # the vhost-user listener, and trio's epoll fd plus its two wakeup socketpairs
                # (the I/O manager's and the entry queue's), made before seccomp.
                assert fd_kinds(pid) == sorted(
                    ["/dev/null", "/dev/null", "pipe", "/dev/net/tun", "anon_inode:[eventpoll]"]
                    + ["socket"] * 6
                )
                inject_frame(nic.tap.name)
                reply = await parent.request("a0", Imsg(MsgType.PROBE_SANDBOX, {}))
                results = reply.payload["results"]
                wrong = {k: results[k] for k in FORBIDDEN if results[k] != "EPERM"}
                assert not wrong, wrong
                assert results["clone3"] == "ENOSYS"
                # (the trio_* probes are run by the sandbox test child itself, not by run_probes)
                probed = [k for k in ALLOWED if not k.startswith("trio_")]
                not_ok = {k: results[k] for k in probed if results[k] != "ok"}
                assert not not_ok, not_ok
                assert results["tap_readv"] == "ok"  # the frame injected above
                # Still alive and answering after its probes.
                stats = await parent.request("a0", Imsg(MsgType.STATS_REQUEST, {}))
                assert stats.type is MsgType.STATS
                assert stats.payload["tap_offload"] == 0
                assert nic.pid == pid
                nursery.cancel_scope.cancel()
            assert parent.nics == {}

    trio.run(main)


def test_worker_tunscap_sets_tap_offloads_through_the_parent(in_netns: str) -> None:
    """A guest negotiation over vhost-user reaches the tap only through the parent's ioctl."""
    from tests.vhost_frontend import FakeFrontend
    from vmd_py.virtio_defs import NetF, TunF

    async def wait_offload(nic_tap: object, want: int) -> None:
        with trio.fail_after(10):
            while nic_tap.read_offload() != want:  # type: ignore[attr-defined]
                await trio.sleep(0.02)

    async def main() -> None:
        parent = Parent()
        with tempfile.TemporaryDirectory() as runtime:
            path = f"{runtime}/t0.sock"
            async with trio.open_nursery() as nursery:
                await nursery.start(parent.run)
                nic = await parent.add_nic(NicSpec("t0", "vtapt0", offload="all", vhost_path=path))
                assert nic.tap.read_offload() == 0
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                front = FakeFrontend(sock)
                acked = int(
                    NetF.VERSION_1 | NetF.CSUM | NetF.GUEST_CSUM | NetF.GUEST_TSO4
                    | NetF.GUEST_TSO6 | NetF.HOST_TSO4 | NetF.MRG_RXBUF
                )
                offered = (await trio.to_thread.run_sync(front.start, acked))["features"]
                assert offered & NetF.GUEST_CSUM and offered & NetF.GUEST_TSO4
                await wait_offload(nic.tap, int(TunF.CSUM | TunF.TSO4 | TunF.TSO6))
                stats = await parent.request("t0", Imsg(MsgType.STATS_REQUEST, {}))
                assert stats.payload["features_acked"] == acked
                assert stats.payload["tap_offload"] == TunF.CSUM | TunF.TSO4 | TunF.TSO6
                # The guest stops the device (GET_VRING_BASE on every ring): back to 0.
                await trio.to_thread.run_sync(front.stop)
                await wait_offload(nic.tap, 0)
                # A guest that acks only checksum offload gets only TUN_F_CSUM.
                await trio.to_thread.run_sync(
                    front.start, int(NetF.VERSION_1 | NetF.CSUM | NetF.GUEST_CSUM)
                )
                await wait_offload(nic.tap, int(TunF.CSUM))
                front.close()
                nursery.cancel_scope.cancel()

    trio.run(main)
