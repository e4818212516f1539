"""A hostile worker against the live parent: refused, answered, counted, fds closed, parent up."""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import pytest
import trio

from imsg.catalogue import VIONET_FROM_PARENT, MsgType
from imsg.channel import ImsgSocket, TrioImsgChannel, socketpair
from imsg.codec import Imsg, encode
from imsg.header import HEADER
from parent.supervisor import NicSpec, Parent
from vmd_py.virtio_defs import NetF, TunF

pytestmark = pytest.mark.hostile


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _raw(msg_type: int, payload: object, flags: int = 0) -> bytes:
    body = msgpack.packb(payload)
    return HEADER.pack(msg_type, 16 + len(body), flags, 0, 0) + body


def _send_with_fds(sock: socket.socket, data: bytes, nfds: int) -> None:
    fds = [os.eventfd(0) for _ in range(nfds)]
    try:
        rights = struct.pack(f"{nfds}i", *fds)
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    finally:
        for fd in fds:
            os.close(fd)


def test_parent_refuses_and_survives_hostile_worker(in_netns: str) -> None:
    async def main() -> None:
        parent = Parent()
        async with trio.open_nursery() as nursery:
            await nursery.start(parent.run)
            nic = await parent.add_nic(NicSpec("h0", "vtaph0", offload="csum"), spawn=False)
            p_end, w_end = socketpair()
            nursery.start_soon(parent.serve_worker, nic, p_end)
            worker = TrioImsgChannel(ImsgSocket(w_end, VIONET_FROM_PARENT), role="vionet")
            assert await worker.hello() == "parent"
            baseline = _fd_count()

            async def expect_error(code: str) -> None:
                with trio.fail_after(5):
                    reply = await worker.receive()
                assert reply.type is MsgType.ERROR, reply
                assert reply.payload["code"] == code, reply.payload

            cases: list[tuple[str, bytes, int]] = [
                ("truncated", b"\x01\x02\x03", 0),
                ("bad_length", HEADER.pack(10, 99, 0, 0, 0) + b"\x80", 0),
                ("oversized", b"\0" * 20000, 0),
                ("unknown_type", _raw(9999, {}), 0),
                ("not_allowed", _raw(int(MsgType.PROBE_SANDBOX), {}), 0),
                ("bad_payload", HEADER.pack(10, 20, 0, 0, 0) + b"\xc1\xc1\xc1\xc1", 0),
                ("schema", _raw(int(MsgType.TUNSCAP), {"mask": "x", "features": 1}), 0),
                ("schema", _raw(int(MsgType.TUNSCAP), {"mask": -1, "features": 1}), 0),
                ("bad_flags", _raw(int(MsgType.TUNSCAP), {"mask": 0, "features": 0}, 1), 0),
                ("unexpected_fds",
                 _raw(int(MsgType.TUNSCAP), {"mask": 0, "features": 0}, 1), 1),
                ("too_many_fds",
                 _raw(int(MsgType.TUNSCAP), {"mask": 0, "features": 0}, 1), 8),
                ("ctrunc", _raw(int(MsgType.TUNSCAP), {"mask": 0, "features": 0}, 1), 100),
                ("sequence", encode(Imsg(MsgType.HELLO, {"version": 1, "role": "x"})), 0),
            ]
            for code, data, nfds in cases:
                if nfds:
                    _send_with_fds(w_end, data, nfds)
                else:
                    w_end.send(data)
                await expect_error(code)
                assert nic.counters[f"refused_{code}"] >= 1
            # Every fd that came with a refused message is closed again.
            assert _fd_count() == baseline

            csum = int(NetF.GUEST_CSUM | NetF.CSUM | NetF.VERSION_1)
            forged = [
                ("unknown_bits", 0x1000 | TunF.CSUM, csum),
                ("needs_csum", int(TunF.TSO4), csum),
                ("not_offered", int(TunF.CSUM | TunF.TSO4), csum | NetF.GUEST_TSO4),
                ("not_negotiated", int(TunF.CSUM), int(NetF.VERSION_1)),
            ]
            for reason, mask, features in forged:
                await worker.send(Imsg(MsgType.TUNSCAP, {"mask": mask, "features": features}))
                await expect_error(reason)
                assert nic.counters[f"tunscap_refused_{reason}"] == 1
                assert nic.tap.read_offload() == 0

            # Still serving: a legitimate request is applied and read back from the kernel.
            await worker.send(Imsg(MsgType.TUNSCAP, {"mask": int(TunF.CSUM), "features": csum}))
            with trio.fail_after(5):
                reply = await worker.receive()
            assert reply.type is MsgType.TUNSCAP_RESULT and reply.payload["mask"] == TunF.CSUM
            assert nic.tap.read_offload() == TunF.CSUM
            # The worker goes away: the parent notices and resets the offloads.
            worker.close()
            with trio.fail_after(5):
                while nic.chan is not None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
