"""imsg codec: round trips for every type, schema bounds, and what encode refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imsg.catalogue import (
    CATALOGUE,
    PARENT_FROM_VIONET,
    VIONET_FROM_PARENT,
    Kind,
    MsgType,
    result_type_for,
)
from imsg.codec import Imsg, _check_value, decode, encode, error_payload, validate_payload
from imsg.errors import ImsgError, ImsgErrorKind
from imsg.header import FLAG_HASFD, HEADER_SIZE, MAX_IMSG_SIZE, Header
from tests.imsg_strategies import (
    KIND_VALUES,
    MAP_MAX,
    NAME_MAX,
    STRMAP_VALUE_MAX,
    TEXT_MAX,
    UINT_MAX,
    messages,
    payloads,
)

SETTINGS = settings(max_examples=300, deadline=None)


def _typed(value: Any) -> Any:
    """``value`` with every leaf tagged by its type: ``True == 1`` must not pass for equal."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    return (type(value), value)


def _body_size(payload: dict[str, Any]) -> int:
    return len(msgpack.packb(payload, use_bin_type=True))


@SETTINGS
@given(messages)
def test_round_trip_every_type(msg: Imsg) -> None:
    if HEADER_SIZE + _body_size(msg.payload) > MAX_IMSG_SIZE:
        # Only a TEXT of thousands of multi-byte characters gets here.
        with pytest.raises(ValueError, match="exceeds"):
            encode(msg)
        return
    data = encode(msg)
    hdr = Header.unpack(data)
    assert (hdr.type, hdr.length, hdr.flags) == (int(msg.type), len(data), 0)
    back = decode(data)
    assert back == msg
    assert _typed(back.payload) == _typed(msg.payload)


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_round_trip_each_type_explicitly(msg_type: MsgType) -> None:
    """The property test samples types; make sure each one is exercised at least once."""

    @settings(max_examples=20, deadline=None)
    @given(payloads(msg_type), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    def check(payload: dict[str, Any], peerid: int, pid: int) -> None:
        msg = Imsg(msg_type, payload, [], peerid, pid)
        if HEADER_SIZE + _body_size(payload) <= MAX_IMSG_SIZE:
            assert decode(encode(msg)) == msg

    check()


def test_decode_respects_allow_list_for_valid_messages() -> None:
    for msg_type in MsgType:
        data = encode(Imsg(msg_type, _minimal_payload(msg_type)))
        for allowed in (PARENT_FROM_VIONET, VIONET_FROM_PARENT):
            if msg_type in allowed:
                assert decode(data, allowed=allowed).type is msg_type
            else:
                with pytest.raises(ImsgError) as exc:
                    decode(data, allowed=allowed)
                assert exc.value.kind is ImsgErrorKind.NOT_ALLOWED


def _minimal_payload(msg_type: MsgType) -> dict[str, Any]:
    zero: dict[Kind, Any] = {
        Kind.U8: 0, Kind.U16: 0, Kind.U32: 0, Kind.U64: 0, Kind.BOOL: False,
        Kind.NAME: "", Kind.TEXT: "", Kind.COUNTERS: {}, Kind.STRMAP: {}, Kind.DOC: {},
    }
    return {name: zero[kind] for name, kind in CATALOGUE[msg_type].fields.items()}


# --- schema bounds, one Kind at a time --------------------------------------------------------

_IN_BOUNDS: dict[Kind, list[Any]] = {
    **{k: [0, 1, top] for k, top in UINT_MAX.items()},
    Kind.BOOL: [True, False],
    Kind.NAME: ["", "x" * NAME_MAX, "\U0001f600" * NAME_MAX],
    Kind.TEXT: ["", "y" * TEXT_MAX],
    Kind.COUNTERS: [{}, {f"c{i}": i for i in range(MAP_MAX)}, {"n" * NAME_MAX: 2**64 - 1}],
    Kind.STRMAP: [{}, {f"k{i}": "v" for i in range(MAP_MAX)}, {"k": "v" * STRMAP_VALUE_MAX}],
    Kind.DOC: [{}, {"vms": [{"name": "a", "nics": [{"counters": {"x": 1}}]}]}],
}
_OUT_OF_BOUNDS: dict[Kind, list[Any]] = {
    **{k: [-1, top + 1, True, False, 1.0, "1", None, b"\x01"] for k, top in UINT_MAX.items()},
    Kind.BOOL: [0, 1, None, "true", 1.0],
    Kind.NAME: ["x" * (NAME_MAX + 1), b"bytes", 1, None, ["a"]],
    Kind.TEXT: ["y" * (TEXT_MAX + 1), b"bytes", 0, None],
    Kind.COUNTERS: [
        {f"c{i}": i for i in range(MAP_MAX + 1)},
        {"n" * (NAME_MAX + 1): 1},
        {"c": -1},
        {"c": 2**64},
        {"c": True},
        {b"c": 1},
        {"c": "1"},
        [("c", 1)],
    ],
    Kind.STRMAP: [
        {f"k{i}": "v" for i in range(MAP_MAX + 1)},
        {"k": "v" * (STRMAP_VALUE_MAX + 1)},
        {"k" * (NAME_MAX + 1): "v"},
        {"k": 1},
        {"k": b"v"},
        {b"k": "v"},
        "k=v",
    ],
    Kind.DOC: [[], "doc", 1, None, b"doc"],
}


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_check_value_bounds(kind: Kind) -> None:
    for good in _IN_BOUNDS[kind]:
        assert _check_value(kind, good), (kind, good)
    for bad in _OUT_OF_BOUNDS[kind]:
        assert not _check_value(kind, bad), (kind, bad)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
@SETTINGS
@given(data=st.data())
def test_kind_strategies_are_valid(kind: Kind, data: st.DataObject) -> None:
    """The strategies the fuzzers use stay inside the schema (else round trips prove little)."""
    assert _check_value(kind, data.draw(KIND_VALUES[kind]))


def _fields_using(kind: Kind) -> list[tuple[MsgType, str]]:
    return [(t, n) for t, spec in CATALOGUE.items() for n, k in spec.fields.items() if k is kind]


@pytest.mark.parametrize(
    ("msg_type", "name"),
    [pair for kind in Kind for pair in _fields_using(kind)[:1]],
    ids=lambda v: v.name if isinstance(v, MsgType) else str(v),
)
def test_bounds_through_the_wire(msg_type: MsgType, name: str) -> None:
    """The same bounds, through encode/decode of a real message using each Kind."""
    kind = CATALOGUE[msg_type].fields[name]
    base = _minimal_payload(msg_type)
    for good in _IN_BOUNDS[kind]:
        msg = Imsg(msg_type, {**base, name: good})
        assert decode(encode(msg)).payload[name] == good
    for bad in _OUT_OF_BOUNDS[kind]:
        with pytest.raises(ImsgError) as exc:
            validate_payload(msg_type, {**base, name: bad})
        assert exc.value.kind is ImsgErrorKind.SCHEMA


# --- encode refusals ------------------------------------------------------------------------


def test_encode_refuses_bad_payload_with_schema_error() -> None:
    with pytest.raises(ImsgError) as exc:
        encode(Imsg(MsgType.HELLO, {"version": 1}))
    assert exc.value.kind is ImsgErrorKind.SCHEMA


def test_encode_refuses_fds_on_a_type_without_fds() -> None:
    with pytest.raises(ValueError, match="carries 0 fds"):
        encode(Imsg(MsgType.OK, {}, fds=[0]))


def test_encode_refuses_oversized() -> None:
    # 4096 four-byte characters: valid by the schema, too big for the wire.
    msg = Imsg(MsgType.ERROR, {"code": "c", "detail": "\U0001f600" * TEXT_MAX, "request": 0})
    with pytest.raises(ValueError, match="exceeds"):
        encode(msg)
    with pytest.raises(ValueError, match="exceeds"):
        encode(Imsg(MsgType.HELLO, {"version": 1, "role": "r" * 40}), max_size=HEADER_SIZE + 8)


def test_encode_sets_hasfd_only_with_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    from imsg.catalogue import Spec

    monkeypatch.setitem(CATALOGUE, MsgType.OK, Spec({}, fds=1))
    data = encode(Imsg(MsgType.OK, {}, fds=[7]))
    assert Header.unpack(data).flags == FLAG_HASFD
    assert decode(data, nfds=1).type is MsgType.OK
    with pytest.raises(ValueError, match="carries 1 fds"):
        encode(Imsg(MsgType.OK, {}))


# --- error_payload --------------------------------------------------------------------------


@SETTINGS
@given(st.text(max_size=200), st.text(max_size=6000), st.integers(-(2**70), 2**70))
def test_error_payload_always_encodes(code: str, detail: str, request: int) -> None:
    payload = dict(error_payload(code, detail, request))
    back = decode(encode(Imsg(MsgType.ERROR, payload)))
    assert back.payload["code"] == code[:NAME_MAX]
    assert detail.startswith(back.payload["detail"])
    assert back.payload["request"] == request % 2**32


def test_error_payload_survives_hostile_strings() -> None:
    """send_error() may be handed any text (peer-chosen names, exception strings): it must
    still encode. 4096 four-byte characters are valid TEXT but do not fit in one imsg."""
    huge = "\U0001f600" * 5000
    payload = dict(error_payload("\U0001f600" * 100, huge, 0))
    assert len(encode(Imsg(MsgType.ERROR, payload))) <= MAX_IMSG_SIZE
    assert huge.startswith(payload["detail"]) and len(payload["detail"]) >= 2000
    # Lone surrogates (os.fsdecode of a bad path) cannot be packed as UTF-8: they become "?".
    payload = dict(error_payload("\udcff", "path \udcfe", 1))
    back = decode(encode(Imsg(MsgType.ERROR, payload)))
    assert (back.payload["code"], back.payload["detail"]) == ("?", "path ?")


# --- catalogue sanity -----------------------------------------------------------------------


def test_catalogue_results_are_catalogued_and_allowed_the_other_way() -> None:
    for msg_type, spec in CATALOGUE.items():
        assert result_type_for(msg_type) is spec.result
        if spec.result is None:
            continue
        assert spec.result in CATALOGUE
        # A request one side may receive is answered by a type the other side may receive.
        if msg_type in VIONET_FROM_PARENT:
            assert spec.result in PARENT_FROM_VIONET
        if msg_type in PARENT_FROM_VIONET:
            assert spec.result in VIONET_FROM_PARENT
    assert set(CATALOGUE) == set(MsgType)
    assert all(spec.optional <= set(spec.fields) for spec in CATALOGUE.values())
