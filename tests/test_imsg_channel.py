"""imsg over a real SOCK_SEQPACKET socketpair: fd passing, counters, and the trio handshake."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import pytest
import trio

from imsg.catalogue import (
    CATALOGUE,
    PARENT_FROM_VIONET,
    PROTOCOL_VERSION,
    VIONET_FROM_PARENT,
    MsgType,
    Spec,
)
from imsg.channel import ImsgSocket, TrioImsgChannel, socketpair
from imsg.codec import Imsg
from imsg.errors import ImsgError, ImsgErrorKind

TIMEOUT = 5.0


@pytest.fixture
def pair() -> Iterator[tuple[ImsgSocket, ImsgSocket]]:
    """(parent end, vionet end), each with its side's allow-list."""
    a, b = socketpair()
    for s in (a, b):
        s.settimeout(TIMEOUT)
    parent = ImsgSocket(a, PARENT_FROM_VIONET, peerid=7)
    vionet = ImsgSocket(b, VIONET_FROM_PARENT)
    try:
        yield parent, vionet
    finally:
        parent.close()
        vionet.close()


@pytest.fixture
def ok_takes_an_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    # No catalogued type carries fds yet; let OK carry one so the happy path can be tested.
    monkeypatch.setitem(CATALOGUE, MsgType.OK, Spec({}, fds=1))


def test_requires_seqpacket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, pytest.raises(ValueError, match="SEQPACKET"):
        ImsgSocket(a, PARENT_FROM_VIONET)


def test_socketpair_is_seqpacket_and_cloexec() -> None:
    a, b = socketpair()
    with a, b:
        assert a.type == b.type == socket.SOCK_SEQPACKET
        assert not a.get_inheritable() and not b.get_inheritable()


def test_send_recv_fills_pid_peerid_and_counts(pair: tuple[ImsgSocket, ImsgSocket]) -> None:
    parent, vionet = pair
    parent.send(Imsg(MsgType.STATS_REQUEST))
    msg = vionet.recv()
    assert (msg.type, msg.payload, msg.fds) == (MsgType.STATS_REQUEST, {}, [])
    assert (msg.pid, msg.peerid) == (os.getpid(), 7)
    stats = {
        "features_offered": 2**64 - 1, "features_acked": 1 << 32, "tap_offload": 0x1F,
        "paused": False, "counters": {"rx_packets": 12, "tx_dropped_bad_src": 0},
    }
    vionet.send(Imsg(MsgType.STATS, stats, pid=42, peerid=3))
    back = parent.recv()
    assert (back.type, back.payload, back.pid, back.peerid) == (MsgType.STATS, stats, 42, 3)
    assert (parent.sent, parent.received, vionet.sent, vionet.received) == (1, 1, 1, 1)
    assert not parent.errors and not vionet.errors


def test_send_error_round_trip(pair: tuple[ImsgSocket, ImsgSocket]) -> None:
    parent, vionet = pair
    vionet.send_error("schema", "\U0001f600" * 5000, request=int(MsgType.TUNSCAP))
    msg = parent.recv()
    assert msg.type is MsgType.ERROR
    assert msg.payload["code"] == "schema"
    assert msg.payload["request"] == MsgType.TUNSCAP
    assert set(msg.payload["detail"]) == {"\U0001f600"}


def test_allow_list_enforced_on_receive(pair: tuple[ImsgSocket, ImsgSocket]) -> None:
    parent, vionet = pair
    # The sender does not police direction; the receiver does.
    parent.send(Imsg(MsgType.TUNSCAP, {"mask": 1, "features": 2}))
    with pytest.raises(ImsgError) as exc:
        vionet.recv()
    assert exc.value.kind is ImsgErrorKind.NOT_ALLOWED
    assert vionet.errors == {"not_allowed": 1}
    assert vionet.received == 0


@pytest.mark.usefixtures("ok_takes_an_fd")
def test_pipe_fd_is_passed_and_usable(pair: tuple[ImsgSocket, ImsgSocket]) -> None:
    parent, vionet = pair
    r, w = os.pipe()
    try:
        vionet.send(Imsg(MsgType.OK, {}, fds=[w]))
        os.close(w)  # only the received copy is left
        msg = parent.recv()
        assert msg.type is MsgType.OK and len(msg.fds) == 1
        (got,) = msg.fds
        assert not os.get_inheritable(got)  # MSG_CMSG_CLOEXEC: never leaks into an exec
        os.write(got, b"through the passed fd")
        os.close(got)
        assert os.read(r, 100) == b"through the passed fd"
        assert os.read(r, 100) == b""  # that was the last write end
    finally:
        os.close(r)


@pytest.mark.usefixtures("ok_takes_an_fd")
def test_eventfd_is_passed_and_usable(pair: tuple[ImsgSocket, ImsgSocket]) -> None:
    parent, vionet = pair
    efd = os.eventfd(0)
    try:
        parent.send(Imsg(MsgType.OK, {}, fds=[efd]))
        # OK is not in vionet's allow-list; receive on a socket that allows it.
        vionet.allowed = frozenset({MsgType.OK})
        (got,) = vionet.recv().fds
        assert got != efd
        os.eventfd_write(got, 5)
        os.eventfd_write(got, 3)
        os.close(got)
        assert os.eventfd_read(efd) == 8
    finally:
        os.close(efd)


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(TIMEOUT):
            await fn()

    trio.run(bounded)


@pytest.fixture
def trio_pair() -> Iterator[tuple[TrioImsgChannel, TrioImsgChannel]]:
    a, b = socketpair()
    parent = TrioImsgChannel(ImsgSocket(a, PARENT_FROM_VIONET), "parent")
    vionet = TrioImsgChannel(ImsgSocket(b, VIONET_FROM_PARENT), "vionet")
    try:
        yield parent, vionet
    finally:
        parent.close()
        vionet.close()


def test_trio_hello_both_ways_then_messages(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel],
) -> None:
    parent, vionet = trio_pair
    roles: dict[str, str] = {}

    async def main() -> None:
        async def shake(name: str, chan: TrioImsgChannel) -> None:
            roles[name] = await chan.hello()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shake, "parent", parent)
            nursery.start_soon(shake, "vionet", vionet)
        assert roles == {"parent": "vionet", "vionet": "parent"}
        assert (parent.peer_role, vionet.peer_role) == ("vionet", "parent")

        # A receive started first must wait (not fail) for the message.
        async with trio.open_nursery() as nursery:
            got: list[Imsg] = []

            async def receiver() -> None:
                got.append(await vionet.receive())

            nursery.start_soon(receiver)
            await trio.sleep(0.05)
            assert not got
            await parent.send(Imsg(MsgType.PAUSE))
        assert got[0].type is MsgType.PAUSE

        await vionet.send(Imsg(MsgType.TUNSCAP, {"mask": 0x11, "features": 1 << 40}))
        msg = await parent.receive()
        assert (msg.type, msg.payload) == (MsgType.TUNSCAP, {"mask": 0x11, "features": 1 << 40})
        await vionet.send_error("nope", "because", request=5)
        err = await parent.receive()
        assert err.payload == {"code": "nope", "detail": "because", "request": 5}

    _run(main)
    assert not parent.errors and not vionet.errors


def test_trio_receive_raises_eof_when_peer_closes(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel],
) -> None:
    parent, vionet = trio_pair

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parent.hello)
            nursery.start_soon(vionet.hello)
        vionet.close()
        with pytest.raises(EOFError):
            await parent.receive()

    _run(main)


# --- handshake refusals (hostile peer) --------------------------------------------------------


@pytest.mark.hostile
def test_trio_second_hello_refused(trio_pair: tuple[TrioImsgChannel, TrioImsgChannel]) -> None:
    parent, vionet = trio_pair

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parent.hello)
            nursery.start_soon(vionet.hello)
        await vionet.send(Imsg(MsgType.HELLO, {"version": PROTOCOL_VERSION, "role": "again"}))
        with pytest.raises(ImsgError) as exc:
            await parent.receive()
        assert exc.value.kind is ImsgErrorKind.SEQUENCE
        assert parent.peer_role == "vionet"  # the second HELLO changed nothing
        await vionet.send(Imsg(MsgType.OK))
        assert (await parent.receive()).type is MsgType.OK

    _run(main)
    assert parent.errors == {"sequence": 1}


@pytest.mark.hostile
def test_trio_receive_before_hello_refused(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel],
) -> None:
    parent, vionet = trio_pair

    async def main() -> None:
        await vionet.send(Imsg(MsgType.OK))
        with pytest.raises(ImsgError) as exc:
            await parent.receive()
        assert exc.value.kind is ImsgErrorKind.SEQUENCE
        # Even a HELLO is refused by receive(): only hello() may take it.
        await vionet.send(Imsg(MsgType.HELLO, {"version": PROTOCOL_VERSION, "role": "v"}))
        with pytest.raises(ImsgError) as exc:
            await parent.receive()
        assert exc.value.kind is ImsgErrorKind.SEQUENCE
        assert parent.peer_role is None

    _run(main)
    assert parent.errors == {"sequence": 2}


@pytest.mark.hostile
@pytest.mark.usefixtures("ok_takes_an_fd")
def test_trio_hello_refuses_other_first_message_and_closes_its_fds(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel],
) -> None:
    parent, vionet = trio_pair
    r, w = os.pipe()
    os.set_blocking(r, False)

    async def main() -> None:
        vionet.imsock.send(Imsg(MsgType.OK, {}, fds=[w]))
        os.close(w)
        with pytest.raises(ImsgError) as exc:
            await parent.hello()
        assert exc.value.kind is ImsgErrorKind.SEQUENCE
        assert parent.peer_role is None
        assert os.read(r, 1) == b""  # the refused message's fd was closed

    try:
        _run(main)
    finally:
        os.close(r)
    assert parent.errors == {"sequence": 1}


@pytest.mark.hostile
@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32 - 1])
def test_trio_hello_refuses_unknown_version(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel], version: int
) -> None:
    parent, vionet = trio_pair

    async def main() -> None:
        await vionet.send(Imsg(MsgType.HELLO, {"version": version, "role": "vionet"}))
        with pytest.raises(ImsgError) as exc:
            await parent.hello()
        assert exc.value.kind is ImsgErrorKind.VERSION
        assert parent.peer_role is None

    _run(main)
    assert parent.errors == {"version": 1}


@pytest.mark.hostile
def test_trio_hello_refuses_malformed_hello(
    trio_pair: tuple[TrioImsgChannel, TrioImsgChannel],
) -> None:
    parent, vionet = trio_pair

    async def main() -> None:
        vionet.imsock.sock.send(b"\x01\x00\x00\x00\x10\x00")  # half a header
        with pytest.raises(ImsgError) as exc:
            await parent.hello()
        assert exc.value.kind is ImsgErrorKind.TRUNCATED

    _run(main)
    assert parent.errors == {"truncated": 1}
