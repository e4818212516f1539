"""Pure encode/decode of one imsg datagram; no sockets here, so it can be fuzzed directly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from imsg.catalogue import CATALOGUE, Kind, MsgType
from imsg.errors import ImsgError, ImsgErrorKind
from imsg.header import FLAG_HASFD, HEADER_SIZE, KNOWN_FLAGS, MAX_IMSG_SIZE, Header

_UINT_MAX = {Kind.U8: 0xFF, Kind.U16: 0xFFFF, Kind.U32: 0xFFFF_FFFF, Kind.U64: 2**64 - 1}
_MAP_LIMIT = 256
_NAME_MAX = 64
_TEXT_MAX = 4096
_VALUE_MAX = 256


@dataclass
class Imsg:
    type: MsgType
    payload: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)
    peerid: int = 0
    pid: int = 0


def _is_str(value: object, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _check_value(kind: Kind, value: object) -> bool:
    if kind in _UINT_MAX:
        # bool is an int subclass in Python: refuse it where a number is due.
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value <= _UINT_MAX[kind]
        )
    if kind is Kind.BOOL:
        return isinstance(value, bool)
    if kind is Kind.NAME:
        return _is_str(value, _NAME_MAX)
    if kind is Kind.TEXT:
        return _is_str(value, _TEXT_MAX)
    if kind is Kind.COUNTERS:
        return (
            isinstance(value, dict)
            and len(value) <= _MAP_LIMIT
            and all(
                _is_str(k, _NAME_MAX) and _check_value(Kind.U64, v) for k, v in value.items()
            )
        )
    if kind is Kind.STRMAP:
        return (
            isinstance(value, dict)
            and len(value) <= _MAP_LIMIT
            and all(_is_str(k, _NAME_MAX) and _is_str(v, _VALUE_MAX) for k, v in value.items())
        )
    if kind is Kind.DOC:
        return isinstance(value, dict)
    raise AssertionError(kind)  # pragma: no cover - every Kind is handled above


def validate_payload(msg_type: MsgType, payload: object) -> dict[str, Any]:
    """Return the payload if it matches the type's schema exactly, else raise SCHEMA."""
    spec = CATALOGUE[msg_type]
    if not isinstance(payload, dict):
        raise ImsgError(ImsgErrorKind.SCHEMA, f"{msg_type.name}: payload is not a map")
    keys = set(payload)
    required = set(spec.fields) - spec.optional
    if not required <= keys or not keys <= set(spec.fields):
        raise ImsgError(
            ImsgErrorKind.SCHEMA,
            f"{msg_type.name}: fields {sorted(map(str, keys))}, want {sorted(spec.fields)}",
        )
    for name, value in payload.items():
        if not _check_value(spec.fields[name], value):
            raise ImsgError(ImsgErrorKind.SCHEMA, f"{msg_type.name}.{name}: bad value")
    return payload


def encode(msg: Imsg, max_size: int = MAX_IMSG_SIZE) -> bytes:
    """Encode a message, refusing what our own decoder would refuse: a payload off its schema
    raises ImsgError(SCHEMA), a wrong fd count or an oversized message ValueError."""
    payload = validate_payload(msg.type, msg.payload)
    spec = CATALOGUE[msg.type]
    if len(msg.fds) != spec.fds:
        raise ValueError(f"{msg.type.name} carries {spec.fds} fds, not {len(msg.fds)}")
    body = msgpack.packb(payload, use_bin_type=True)
    length = HEADER_SIZE + len(body)
    if length > max_size:
        raise ValueError(f"{msg.type.name}: {length} bytes exceeds {max_size}")
    flags = FLAG_HASFD if msg.fds else 0
    return Header(int(msg.type), length, flags, msg.peerid, msg.pid).pack() + body


def decode(
    data: bytes,
    nfds: int = 0,
    allowed: frozenset[MsgType] | None = None,
    max_size: int = MAX_IMSG_SIZE,
) -> Imsg:
    """Decode one datagram that arrived with ``nfds`` descriptors.

    Raises only :class:`ImsgError`. The caller owns the fds and closes them on error.
    """
    if len(data) > max_size:
        raise ImsgError(ImsgErrorKind.OVERSIZED, f"{len(data)} > {max_size}")
    if len(data) < HEADER_SIZE:
        raise ImsgError(ImsgErrorKind.TRUNCATED, f"{len(data)} bytes")
    hdr = Header.unpack(data)
    if hdr.length != len(data):
        raise ImsgError(ImsgErrorKind.BAD_LENGTH, f"header says {hdr.length}, got {len(data)}")
    if hdr.flags & ~KNOWN_FLAGS or bool(hdr.flags & FLAG_HASFD) != (nfds > 0):
        raise ImsgError(ImsgErrorKind.BAD_FLAGS, f"flags {hdr.flags:#x} with {nfds} fds")
    try:
        msg_type = MsgType(hdr.type)
    except ValueError:
        raise ImsgError(ImsgErrorKind.UNKNOWN_TYPE, str(hdr.type)) from None
    if allowed is not None and msg_type not in allowed:
        raise ImsgError(ImsgErrorKind.NOT_ALLOWED, msg_type.name)
    spec = CATALOGUE[msg_type]
    if nfds > spec.fds:
        raise ImsgError(ImsgErrorKind.UNEXPECTED_FDS, f"{msg_type.name} got {nfds} fds")
    if nfds < spec.fds:
        raise ImsgError(ImsgErrorKind.MISSING_FDS, f"{msg_type.name} got {nfds} fds")
    try:
        # unpackb sizes its max_*_len limits from len(data), already bounded by max_size;
        # strict_map_key keeps keys to str/bytes. Trailing bytes raise ExtraData.
        payload = msgpack.unpackb(
            data[HEADER_SIZE:], raw=False, strict_map_key=True, use_list=True
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ImsgError(ImsgErrorKind.BAD_PAYLOAD, type(exc).__name__) from None
    validated = validate_payload(msg_type, payload)
    return Imsg(msg_type, validated, [], hdr.peerid, hdr.pid)


# A detail of _TEXT_MAX four-byte characters would not fit in MAX_IMSG_SIZE: cap the bytes too.
_DETAIL_BYTES = 8192


def _clip(text: str, max_chars: int, max_bytes: int) -> str:
    # "replace" turns lone surrogates (e.g. from os.fsdecode) into "?" so msgpack can pack them;
    # "ignore" drops a character cut in half by the byte limit.
    clipped = text[:max_chars].encode("utf-8", "replace")[:max_bytes]
    return clipped.decode("utf-8", "ignore")


def error_payload(code: str, detail: str, request: int) -> Mapping[str, Any]:
    """An ERROR payload that always encodes, whatever the (possibly peer-supplied) strings."""
    return {
        "code": _clip(code, _NAME_MAX, 4 * _NAME_MAX),
        "detail": _clip(detail, _TEXT_MAX, _DETAIL_BYTES),
        "request": request & 0xFFFF_FFFF,
    }
