"""Hostile input to the imsg decoder and to a real SOCK_SEQPACKET receive.

Every refusal must be an ImsgError of the right kind, counted, with the message's fds closed, and
the channel must carry on with the next valid message.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from imsg.catalogue import CATALOGUE, PARENT_FROM_VIONET, VIONET_FROM_PARENT, MsgType, Spec
from imsg.channel import _FD_SLACK, DEFAULT_MAX_FDS, ImsgSocket, socketpair
from imsg.codec import Imsg, decode, encode, validate_payload
from imsg.errors import ImsgError, ImsgErrorKind
from imsg.header import FLAG_HASFD, HEADER_SIZE, MAX_IMSG_SIZE
from tests.imsg_strategies import (
    frame,
    framed_payload,
    header,
    message_of,
    messages,
    msgpack_values,
)

pytestmark = pytest.mark.hostile

K = ImsgErrorKind
SETTINGS = settings(max_examples=300, deadline=None)
HELLO = {"version": 1, "role": "vionet"}
# Kinds only a socket or the trio handshake can produce; the rest come from decode() below.
SOCKET_KINDS = {K.TOO_MANY_FDS, K.CTRUNC, K.BAD_CONTROL, K.OVERSIZED, K.TRUNCATED}
TRIO_KINDS = {K.VERSION, K.SEQUENCE}  # tests/test_imsg_channel.py


# --- decode() on arbitrary input ------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=MAX_IMSG_SIZE + 64), st.integers(0, 8))
def test_decode_arbitrary_bytes_raises_only_imsg_error(data: bytes, nfds: int) -> None:
    for allowed in (None, PARENT_FROM_VIONET):
        try:
            msg = decode(data, nfds, allowed)
        except ImsgError:
            continue
        # Random bytes that happen to decode must still be a schema-valid message.
        assert validate_payload(msg.type, msg.payload) is msg.payload


@SETTINGS
@given(
    st.sampled_from(list(MsgType)) | st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
    st.binary(max_size=512),
    st.integers(0, 2),
)
def test_decode_valid_header_then_arbitrary_bytes(
    msg_type: int, flags: int, body: bytes, nfds: int
) -> None:
    data = frame(int(msg_type), body, flags)
    try:
        msg = decode(data, nfds)
    except ImsgError as exc:
        assert isinstance(exc.kind, ImsgErrorKind)
        return
    assert validate_payload(msg.type, msg.payload) is msg.payload


@SETTINGS
@given(messages, st.binary(min_size=1, max_size=64))
def test_decode_valid_message_with_appended_bytes(msg: Imsg, extra: bytes) -> None:
    data = encode(msg) if _fits(msg) else None
    assume(data is not None)
    assert data is not None
    # Length left alone: the datagram is longer than its header says.
    with pytest.raises(ImsgError) as exc:
        decode(data + extra)
    assert exc.value.kind in (K.BAD_LENGTH, K.OVERSIZED)
    # Length fixed up: the payload now has trailing bytes (or is garbage altogether).
    body = data[HEADER_SIZE:] + extra
    with pytest.raises(ImsgError) as exc:
        decode(frame(int(msg.type), body))
    assert exc.value.kind in (K.BAD_PAYLOAD, K.OVERSIZED)


def _fits(msg: Imsg) -> bool:
    try:
        encode(msg)
    except ValueError:
        return False
    return True


@SETTINGS
@given(st.sampled_from(list(MsgType)), msgpack_values)
def test_decode_valid_header_arbitrary_msgpack(msg_type: MsgType, value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    assume(HEADER_SIZE + len(body) <= MAX_IMSG_SIZE)
    try:
        msg = decode(frame(msg_type, body))
    except ImsgError as exc:
        assert exc.kind in (K.SCHEMA, K.BAD_PAYLOAD), exc
        event(exc.kind.value)
        return
    event("accepted")
    assert isinstance(value, dict)
    assert msg.payload == value
    assert set(value) <= set(CATALOGUE[msg_type].fields)


@SETTINGS
@given(st.sampled_from([t for t in MsgType if CATALOGUE[t].fields]).flatmap(message_of), st.data())
def test_decode_one_field_replaced_by_arbitrary_msgpack(msg: Imsg, data: st.DataObject) -> None:
    """A valid message with one field swapped for any msgpack value, or one field dropped."""
    fields = sorted(CATALOGUE[msg.type].fields)
    name = data.draw(st.sampled_from(fields))
    payload = dict(msg.payload)
    if data.draw(st.booleans()):
        payload[name] = data.draw(msgpack_values)
    else:
        payload.pop(name, None)
    body = msgpack.packb(payload, use_bin_type=True)
    assume(HEADER_SIZE + len(body) <= MAX_IMSG_SIZE)
    try:
        back = decode(frame(msg.type, body))
    except ImsgError as exc:
        assert exc.kind in (K.SCHEMA, K.BAD_PAYLOAD), exc
        event(exc.kind.value)
        return
    event("accepted")
    assert back.payload == payload
    assert name in payload or name in CATALOGUE[msg.type].optional


# --- one crafted input per decode-level kind --------------------------------------------------


def _hello_with(**changes: Any) -> bytes:
    payload = {**HELLO, **changes}
    return framed_payload(MsgType.HELLO, {k: v for k, v in payload.items() if v is not _DROP})


_DROP = object()
_VALID_HELLO = framed_payload(MsgType.HELLO, HELLO)
_HELLO_BODY = _VALID_HELLO[HEADER_SIZE:]

# (id, datagram, nfds, allowed, expected kind)
CODEC_CASES: list[tuple[str, bytes, int, frozenset[MsgType] | None, ImsgErrorKind]] = [
    ("empty", b"", 0, None, K.TRUNCATED),
    ("short-header", _VALID_HELLO[: HEADER_SIZE - 1], 0, None, K.TRUNCATED),
    ("oversized", _VALID_HELLO + b"\0" * MAX_IMSG_SIZE, 0, None, K.OVERSIZED),
    ("len-too-big", header(1, len(_VALID_HELLO) + 1) + _HELLO_BODY, 0, None, K.BAD_LENGTH),
    ("len-too-small", header(1, len(_VALID_HELLO) - 1) + _HELLO_BODY, 0, None, K.BAD_LENGTH),
    ("len-zero", header(1, 0) + _HELLO_BODY, 0, None, K.BAD_LENGTH),
    ("unknown-flag", frame(1, _HELLO_BODY, 0x0002), 0, None, K.BAD_FLAGS),
    ("high-flag", frame(1, _HELLO_BODY, 0x8000 | FLAG_HASFD), 1, None, K.BAD_FLAGS),
    ("hasfd-no-fds", frame(1, _HELLO_BODY, FLAG_HASFD), 0, None, K.BAD_FLAGS),
    ("fds-no-hasfd", _VALID_HELLO, 1, None, K.BAD_FLAGS),
    ("type-0", frame(0, _HELLO_BODY), 0, None, K.UNKNOWN_TYPE),
    ("type-9999", frame(9999, _HELLO_BODY), 0, None, K.UNKNOWN_TYPE),
    ("type-u32-max", frame(2**32 - 1, b"\x80"), 0, None, K.UNKNOWN_TYPE),
    ("tunscap-to-vionet", framed_payload(MsgType.TUNSCAP, {"mask": 0, "features": 0}), 0,
     VIONET_FROM_PARENT, K.NOT_ALLOWED),
    ("pause-to-parent", framed_payload(MsgType.PAUSE, {}), 0, PARENT_FROM_VIONET, K.NOT_ALLOWED),
    ("no-payload", frame(1, b""), 0, None, K.BAD_PAYLOAD),
    ("never-used-byte", frame(1, b"\xc1"), 0, None, K.BAD_PAYLOAD),
    ("incomplete-map", frame(1, b"\x82\xa7version\x01"), 0, None, K.BAD_PAYLOAD),
    ("trailing-byte", frame(1, _HELLO_BODY + b"\x00"), 0, None, K.BAD_PAYLOAD),
    ("two-objects", frame(1, _HELLO_BODY + _HELLO_BODY), 0, None, K.BAD_PAYLOAD),
    ("bad-utf8", frame(1, b"\x81\xa2\xff\xfe\x01"), 0, None, K.BAD_PAYLOAD),
    ("int-key", framed_payload(1, {1: 1}), 0, None, K.BAD_PAYLOAD),
    ("deep-nesting", frame(1, b"\x91" * 5000 + b"\xc0"), 0, None, K.BAD_PAYLOAD),
    ("huge-array-claim", frame(1, b"\xdd\xff\xff\xff\xff"), 0, None, K.BAD_PAYLOAD),
    ("not-a-map", framed_payload(1, [1, "vionet"]), 0, None, K.SCHEMA),
    ("nil", framed_payload(1, None), 0, None, K.SCHEMA),
    ("missing-field", _hello_with(role=_DROP), 0, None, K.SCHEMA),
    ("extra-field", _hello_with(extra=1), 0, None, K.SCHEMA),
    ("bytes-key", framed_payload(1, {b"version": 1, "role": "r"}), 0, None, K.SCHEMA),
    ("str-for-u32", _hello_with(version="1"), 0, None, K.SCHEMA),
    ("float-for-u32", _hello_with(version=1.0), 0, None, K.SCHEMA),
    ("bool-for-u32", _hello_with(version=True), 0, None, K.SCHEMA),
    ("negative-u32", _hello_with(version=-1), 0, None, K.SCHEMA),
    ("u32-plus-one", _hello_with(version=2**32), 0, None, K.SCHEMA),
    ("bytes-for-name", _hello_with(role=b"vionet"), 0, None, K.SCHEMA),
    ("long-name", _hello_with(role="x" * 65), 0, None, K.SCHEMA),
    ("int-for-bool", framed_payload(MsgType.STATS, {
        "features_offered": 0, "features_acked": 0, "tap_offload": 0, "paused": 0,
        "counters": {}}), 0, None, K.SCHEMA),
    ("ext-for-u64", framed_payload(MsgType.TUNSCAP, {
        "mask": 0, "features": msgpack.ExtType(1, b"x")}), 0, None, K.SCHEMA),
    ("fds-on-hello", frame(1, _HELLO_BODY, FLAG_HASFD), 1, None, K.UNEXPECTED_FDS),
]


@pytest.mark.parametrize(
    ("data", "nfds", "allowed", "kind"),
    [c[1:] for c in CODEC_CASES],
    ids=[c[0] for c in CODEC_CASES],
)
def test_decode_refuses_crafted(
    data: bytes, nfds: int, allowed: frozenset[MsgType] | None, kind: ImsgErrorKind
) -> None:
    with pytest.raises(ImsgError) as exc:
        decode(data, nfds, allowed)
    assert exc.value.kind is kind, exc.value


def test_trailing_bytes_are_extra_data_in_msgpack_and_refused() -> None:
    """The codec relies on unpackb refusing trailing bytes: check that rather than assume it."""
    with pytest.raises(msgpack.ExtraData):
        msgpack.unpackb(_HELLO_BODY + b"\xc0", raw=False, strict_map_key=True)
    with pytest.raises(ImsgError) as exc:
        decode(frame(MsgType.HELLO, _HELLO_BODY + b"\xc0"))
    assert (exc.value.kind, exc.value.detail) == (K.BAD_PAYLOAD, "ExtraData")


def test_missing_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    # No type takes fds yet; pretend OK takes one, as a future type will.
    monkeypatch.setitem(CATALOGUE, MsgType.OK, Spec({}, fds=1))
    data = framed_payload(MsgType.OK, {})
    with pytest.raises(ImsgError) as exc:
        decode(data, 0)
    assert exc.value.kind is K.MISSING_FDS
    with pytest.raises(ImsgError) as exc:
        decode(framed_payload(MsgType.OK, {}, hasfd=True), 2)
    assert exc.value.kind is K.UNEXPECTED_FDS
    assert decode(framed_payload(MsgType.OK, {}, hasfd=True), 1).type is MsgType.OK


def test_every_kind_has_a_crafted_input() -> None:
    codec_kinds = {c[-1] for c in CODEC_CASES} | {K.MISSING_FDS}
    assert codec_kinds | SOCKET_KINDS | TRIO_KINDS == set(ImsgErrorKind)


# --- a real socket: refusals close fds, are counted, and the channel carries on --------------


@pytest.fixture
def chan() -> Iterator[tuple[ImsgSocket, socket.socket]]:
    """The parent's receiving end, and a raw socket playing a hostile worker."""
    ours, theirs = socketpair()
    ours.settimeout(5)  # a bug must fail the test, not hang it
    imsock = ImsgSocket(ours, PARENT_FROM_VIONET)
    try:
        yield imsock, theirs
    finally:
        imsock.close()
        theirs.close()


def _rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _assert_still_works(imsock: ImsgSocket, peer: socket.socket) -> None:
    before = imsock.received
    peer.send(_VALID_HELLO)
    assert imsock.recv().payload == HELLO
    assert imsock.received == before + 1


def _send_pipe_ends_and_expect(
    imsock: ImsgSocket,
    peer: socket.socket,
    data: bytes,
    copies: int,
    kind: ImsgErrorKind,
    extra_anc: list[tuple[int, int, bytes]] | None = None,
) -> None:
    """Send ``copies`` of a pipe's write end with ``data``; the refusal must close every one."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        count = _fd_count()
        anc = (_rights([w] * copies) if copies else []) + (extra_anc or [])
        peer.sendmsg([data], anc)
        os.close(w)
        with pytest.raises(ImsgError) as exc:
            imsock.recv()
        assert exc.value.kind is kind, exc.value
        assert imsock.errors[kind.value] == 1
        assert sum(imsock.errors.values()) == 1
        # Any surviving copy of the write end would make this raise BlockingIOError, not EOF.
        assert os.read(r, 1) == b""
        assert _fd_count() == count - 1  # only our own write end went
    finally:
        os.close(r)
    _assert_still_works(imsock, peer)


SOCKET_CASES: list[tuple[str, bytes, int, ImsgErrorKind]] = [
    ("fds-without-hasfd", _VALID_HELLO, 1, K.BAD_FLAGS),
    ("hasfd-without-fds", frame(1, _HELLO_BODY, FLAG_HASFD), 0, K.BAD_FLAGS),
    ("unexpected-fds", frame(1, _HELLO_BODY, FLAG_HASFD), 1, K.UNEXPECTED_FDS),
    ("not-allowed", frame(MsgType.PAUSE, b"\x80", FLAG_HASFD), 1, K.NOT_ALLOWED),
    ("unknown-type", frame(777, b"\x80", FLAG_HASFD), 2, K.UNKNOWN_TYPE),
    ("bad-length", header(1, 999, FLAG_HASFD) + _HELLO_BODY, 1, K.BAD_LENGTH),
    ("truncated", b"\x01\x00", 1, K.TRUNCATED),
    ("empty-with-fd", b"", 1, K.TRUNCATED),
    ("schema", _hello_with(version="x"), 0, K.SCHEMA),
    ("garbage", frame(1, b"\xc1\xc1"), 0, K.BAD_PAYLOAD),
    ("too-many-fds", frame(1, _HELLO_BODY, FLAG_HASFD), DEFAULT_MAX_FDS + 1, K.TOO_MANY_FDS),
    ("fds-at-buffer-limit", frame(1, _HELLO_BODY, FLAG_HASFD), DEFAULT_MAX_FDS + _FD_SLACK,
     K.TOO_MANY_FDS),
    ("ctrunc", frame(1, _HELLO_BODY, FLAG_HASFD), 60, K.CTRUNC),
    ("oversized", frame(1, b"\0" * (MAX_IMSG_SIZE + 100 - HEADER_SIZE), FLAG_HASFD), 1,
     K.OVERSIZED),
]


@pytest.mark.parametrize(
    ("data", "copies", "kind"), [c[1:] for c in SOCKET_CASES], ids=[c[0] for c in SOCKET_CASES]
)
def test_socket_refusal_closes_fds_counts_and_recovers(
    chan: tuple[ImsgSocket, socket.socket], data: bytes, copies: int, kind: ImsgErrorKind
) -> None:
    imsock, peer = chan
    _send_pipe_ends_and_expect(imsock, peer, data, copies, kind)


def test_socket_refusal_after_fd_count_closes_fds(
    chan: tuple[ImsgSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors found after the fd checks (payload, schema) must close the fds too."""
    monkeypatch.setitem(CATALOGUE, MsgType.OK, Spec({}, fds=1))
    imsock, peer = chan
    _send_pipe_ends_and_expect(imsock, peer, frame(MsgType.OK, b"\xc1", FLAG_HASFD), 1,
                               K.BAD_PAYLOAD)
    imsock.errors.clear()
    _send_pipe_ends_and_expect(imsock, peer, framed_payload(MsgType.OK, {"x": 1}, hasfd=True), 1,
                               K.SCHEMA)
    imsock.errors.clear()
    peer.send(framed_payload(MsgType.OK, {}))
    with pytest.raises(ImsgError) as exc:
        imsock.recv()
    assert exc.value.kind is K.MISSING_FDS
    assert imsock.errors == {K.MISSING_FDS.value: 1}


def test_oversized_datagram_then_next_is_fine(chan: tuple[ImsgSocket, socket.socket]) -> None:
    imsock, peer = chan
    big = frame(MsgType.HELLO, b"\0" * (MAX_IMSG_SIZE + 100 - HEADER_SIZE))
    assert len(big) == MAX_IMSG_SIZE + 100
    peer.send(big)
    with pytest.raises(ImsgError) as exc:
        imsock.recv()
    assert exc.value.kind is K.OVERSIZED
    _assert_still_works(imsock, peer)
    # Exactly at the limit is not oversized (it is refused for its garbage payload instead).
    peer.send(frame(MsgType.HELLO, b"\0" * (MAX_IMSG_SIZE - HEADER_SIZE)))
    with pytest.raises(ImsgError) as exc:
        imsock.recv()
    assert exc.value.kind is K.BAD_PAYLOAD
    assert imsock.errors == {"oversized": 1, "bad_payload": 1}


def _creds() -> list[tuple[int, int, bytes]]:
    ucred = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
    return [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, ucred)]


def test_credentials_are_bad_control(chan: tuple[ImsgSocket, socket.socket]) -> None:
    imsock, peer = chan
    imsock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    _send_pipe_ends_and_expect_passcred(imsock, peer)


def _send_pipe_ends_and_expect_passcred(imsock: ImsgSocket, peer: socket.socket) -> None:
    # Explicit credentials with an fd: refused, fd closed.
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        peer.sendmsg([frame(1, _HELLO_BODY, FLAG_HASFD)], _rights([w]) + _creds())
        os.close(w)
        with pytest.raises(ImsgError) as exc:
            imsock.recv()
        assert exc.value.kind is K.BAD_CONTROL
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
    # With SO_PASSCRED the kernel attaches credentials to every datagram: a channel socket must
    # never have it set, and if it does, nothing gets through rather than something unchecked.
    peer.send(_VALID_HELLO)
    with pytest.raises(ImsgError) as exc:
        imsock.recv()
    assert exc.value.kind is K.BAD_CONTROL
    assert imsock.errors == {"bad_control": 2}
    imsock.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
    _assert_still_works(imsock, peer)


def test_empty_datagram_is_truncated_while_peer_lives_then_eof(
    chan: tuple[ImsgSocket, socket.socket],
) -> None:
    imsock, peer = chan
    peer.send(b"")
    with pytest.raises(ImsgError) as exc:
        imsock.recv()
    assert exc.value.kind is K.TRUNCATED
    _assert_still_works(imsock, peer)
    peer.send(_VALID_HELLO)
    peer.close()
    # Queued messages are still delivered after the peer has gone; then EOF, repeatably.
    assert imsock.recv().type is MsgType.HELLO
    for _ in range(2):
        with pytest.raises(EOFError):
            imsock.recv()
    assert imsock.errors == {"truncated": 1}


def test_nonblocking_recv_with_nothing_queued(chan: tuple[ImsgSocket, socket.socket]) -> None:
    imsock, _ = chan
    imsock.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        imsock.recv()
    assert not imsock.errors


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300) | messages, max_size=12))
def test_socket_stream_of_junk_and_messages(items: list[bytes | Imsg]) -> None:
    """Interleaved junk and valid messages: each junk datagram costs exactly one counted error,
    each valid one arrives intact and in order."""
    ours, theirs = socketpair()
    ours.settimeout(5)
    imsock = ImsgSocket(ours, frozenset(MsgType))
    try:
        expected_errors = 0
        for item in items:
            data = item if isinstance(item, bytes) else (encode(item) if _fits(item) else b"")
            theirs.send(data)
            try:
                want: Imsg | None = decode(data)
            except ImsgError:
                want = None
                expected_errors += 1
            if want is None:
                with pytest.raises(ImsgError):
                    imsock.recv()
            else:
                assert imsock.recv() == want
        assert sum(imsock.errors.values()) == expected_errors
    finally:
        imsock.close()
        theirs.close()
