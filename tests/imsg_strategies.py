"""Hypothesis strategies for the imsg tests, derived from the catalogue so they follow it."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st

from imsg.catalogue import CATALOGUE, Kind, MsgType
from imsg.codec import Imsg
from imsg.header import FLAG_HASFD, HEADER_SIZE, Header

UINT_MAX = {Kind.U8: 0xFF, Kind.U16: 0xFFFF, Kind.U32: 0xFFFF_FFFF, Kind.U64: 2**64 - 1}
NAME_MAX = 64
TEXT_MAX = 4096
MAP_MAX = 256
STRMAP_VALUE_MAX = 256

u32s = st.integers(0, UINT_MAX[Kind.U32])
names = st.text(max_size=NAME_MAX)

KIND_VALUES: dict[Kind, st.SearchStrategy[Any]] = {
    **{kind: st.integers(0, top) for kind, top in UINT_MAX.items()},
    Kind.BOOL: st.booleans(),
    Kind.NAME: names,
    Kind.TEXT: st.text(max_size=TEXT_MAX),
    Kind.COUNTERS: st.dictionaries(names, st.integers(0, UINT_MAX[Kind.U64]), max_size=MAP_MAX),
    Kind.STRMAP: st.dictionaries(names, st.text(max_size=STRMAP_VALUE_MAX), max_size=MAP_MAX),
    Kind.DOC: st.dictionaries(
        names,
        st.recursive(
            st.none() | st.booleans() | st.integers(0, 2**32) | st.text(max_size=32),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(names, inner, max_size=4),
            max_leaves=10,
        ),
        max_size=6,
    ),
}
assert set(KIND_VALUES) == set(Kind), "a new Kind needs a strategy"


def payloads(msg_type: MsgType) -> st.SearchStrategy[dict[str, Any]]:
    """Payloads that match ``msg_type``'s schema (optional fields present or not)."""
    spec = CATALOGUE[msg_type]
    required = {n: KIND_VALUES[k] for n, k in spec.fields.items() if n not in spec.optional}
    optional = {n: KIND_VALUES[k] for n, k in spec.fields.items() if n in spec.optional}
    return st.fixed_dictionaries(required, optional=optional)


def message_of(msg_type: MsgType) -> st.SearchStrategy[Imsg]:
    # No type carries fds yet; a type that does needs fds from the test, not from here.
    assert CATALOGUE[msg_type].fds == 0
    return st.builds(Imsg, st.just(msg_type), payloads(msg_type), peerid=u32s, pid=u32s)


messages: st.SearchStrategy[Imsg] = st.sampled_from(list(MsgType)).flatmap(message_of)

_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=80)
    | st.binary(max_size=80)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16))
)
_field_names = st.sampled_from(
    sorted({name for spec in CATALOGUE.values() for name in spec.fields})
)
_keys: st.SearchStrategy[Any] = _field_names | st.text(max_size=70) | st.binary(max_size=8)

# Anything msgpack can pack, biased towards maps keyed by real field names so SCHEMA is probed
# field by field rather than only at "not a map".
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=8)
    | st.dictionaries(_keys, children, max_size=8),
    max_leaves=24,
)


def header(
    msg_type: int, length: int, flags: int = 0, peerid: int = 0, pid: int = 0
) -> bytes:
    return Header(msg_type, length, flags, peerid, pid).pack()


def frame(msg_type: int, body: bytes, flags: int = 0) -> bytes:
    """A datagram whose header is consistent with ``body`` (length right, flags as given)."""
    return header(msg_type, HEADER_SIZE + len(body), flags) + body


def framed_payload(msg_type: int, payload: object, *, hasfd: bool = False) -> bytes:
    return frame(msg_type, msgpack.packb(payload, use_bin_type=True), FLAG_HASFD if hasfd else 0)
