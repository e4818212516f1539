"""Fuzz the vhost-user decoder: decode_request on any frame, and recv_frame's header parsing
on any byte stream. Only VhostUserError (and EOFError at a clean end) may escape; every
refused message's fds are closed, no fd leaks, and accepted payloads re-encode exactly."""

from __future__ import annotations

import fcntl
import os
import socket

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
import trio  # not ours: imported before instrumentation so it is left alone
from _formats import VhostCase
from _fuzzlib import check

with atheris.instrument_imports(include=["vionet.vhost_user"]):
    from vionet.vhost_user import (
        HEADER_SIZE,
        MAX_PAYLOAD,
        Frame,
        Header,
        MemTable,
        VhostUserError,
        decode_request,
        pack_payload,
        recv_frame,
        send_message,
    )

assert trio


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _decode(frame: Frame) -> None:
    fds = list(frame.fds)
    try:
        msg = decode_request(frame)
    except VhostUserError as err:
        check(not any(_is_open(fd) for fd in fds), "a refused frame's fd stayed open")
        check(not err.fatal, "decode_request raised a fatal error")
        check(err.request == frame.header.request, "error lost the request")
        return
    try:
        check(msg.fds == fds, "accepted message changed its fds")
        check(msg.flags == frame.header.flags, "flags changed")
        body = pack_payload(msg.payload)
        if isinstance(msg.payload, MemTable):
            # The padding word after nregions is ignored on decode and packed as zero.
            body = body[:4] + frame.payload[4:8] + body[8:]
        check(body == frame.payload, f"{msg.request.name} payload does not re-encode")
    finally:
        for fd in fds:
            os.close(fd)


def _direct(case: VhostCase) -> None:
    wire = case.wire.ljust(HEADER_SIZE, b"\0")
    _decode(Frame(Header.unpack(wire[:HEADER_SIZE]), wire[HEADER_SIZE:], _eventfds(case.nfds)))


def _stream(case: VhostCase) -> None:
    before = _open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        fds = _eventfds(case.nfds) if case.wire else []
        try:
            if case.wire:
                send_message(a, case.wire, fds)
        finally:
            for fd in fds:
                os.close(fd)
        a.shutdown(socket.SHUT_WR)
        for _ in range(len(case.wire) // HEADER_SIZE + 2):
            try:
                frame = recv_frame(b)
            except EOFError:
                break
            except VhostUserError as err:
                if err.fatal:
                    break
                continue
            check(frame.header.size == len(frame.payload) <= MAX_PAYLOAD, "frame size")
            _decode(frame)
        else:
            raise _fuzzlib.Invariant("recv_frame read more frames than the stream holds")
    check(_open_fds() <= before, "fds leaked")


def test_one_input(data: bytes) -> None:
    case = VhostCase.parse(data)
    if case.stream:
        _stream(case)
    else:
        _direct(case)


if __name__ == "__main__":
    _fuzzlib.main("vhost_user", test_one_input, max_len=2 * MAX_PAYLOAD)
