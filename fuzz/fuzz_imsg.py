"""Fuzz imsg.codec.decode: any datagram, fd count and allow-list raises only ImsgError, and
whatever it accepts re-encodes to a canonical form that decodes back to itself."""

from __future__ import annotations

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
import msgpack  # not ours: imported before instrumentation so it is left alone
from _formats import IMSG_ALLOW_LISTS, ImsgCase
from _fuzzlib import check

with atheris.instrument_imports(include=["imsg"]):
    from imsg import catalogue
    from imsg.catalogue import CATALOGUE, MsgType
    from imsg.codec import Imsg, decode, encode
    from imsg.errors import ImsgError
    from imsg.header import MAX_IMSG_SIZE

assert msgpack

ALLOW_LISTS: tuple[frozenset[MsgType], ...] = tuple(
    getattr(catalogue, name) for name in IMSG_ALLOW_LISTS
)


def allow_list(selector: int) -> frozenset[MsgType] | None:
    k = selector % (len(ALLOW_LISTS) + 1)
    return None if k == 0 else ALLOW_LISTS[k - 1]


def test_one_input(data: bytes) -> None:
    case = ImsgCase.parse(data)
    allowed = allow_list(case.allowed)
    try:
        msg = decode(case.datagram, case.nfds, allowed)
    except ImsgError:
        return
    spec = CATALOGUE[msg.type]
    check(allowed is None or msg.type in allowed, f"{msg.type.name} not in the allow-list")
    check(case.nfds == spec.fds, f"{msg.type.name} accepted with {case.nfds} fds")
    check(len(case.datagram) <= MAX_IMSG_SIZE, "oversized datagram accepted")
    # The canonical encoding of an accepted message is a fixed point of decode/encode.
    fds = list(range(spec.fds))
    try:
        first = encode(Imsg(msg.type, msg.payload, fds, msg.peerid, msg.pid))
    except ValueError:
        # Only growth past the size limit may stop a re-encode (float32 comes back float64).
        return
    again = decode(first, case.nfds, allowed)
    second = encode(Imsg(again.type, again.payload, fds, again.peerid, again.pid))
    check(first == second, "decode/encode is not a fixed point")
    check((again.type, again.peerid, again.pid) == (msg.type, msg.peerid, msg.pid), "header")


if __name__ == "__main__":
    _fuzzlib.main("imsg", test_one_input, max_len=MAX_IMSG_SIZE + 256)
