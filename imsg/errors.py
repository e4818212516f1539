"""The one exception type an imsg receive may raise, with a reason that can be counted."""

from __future__ import annotations

import enum


class ImsgErrorKind(enum.Enum):
    TRUNCATED = "truncated"  # shorter than a header, or an empty datagram
    OVERSIZED = "oversized"  # larger than the channel's limit
    BAD_LENGTH = "bad_length"  # header length disagrees with the datagram
    BAD_FLAGS = "bad_flags"  # unknown flag bits, or HASFD disagreeing with the fds
    UNKNOWN_TYPE = "unknown_type"
    NOT_ALLOWED = "not_allowed"  # a known type this channel must not receive
    BAD_PAYLOAD = "bad_payload"  # not msgpack, or trailing bytes
    SCHEMA = "schema"  # msgpack, but not the type's schema
    TOO_MANY_FDS = "too_many_fds"
    UNEXPECTED_FDS = "unexpected_fds"  # fds on a type that takes none (or more than it takes)
    MISSING_FDS = "missing_fds"
    CTRUNC = "ctrunc"  # the kernel dropped control data: fds were lost
    BAD_CONTROL = "bad_control"  # control messages other than SCM_RIGHTS
    VERSION = "version"  # hello with an unknown protocol version
    SEQUENCE = "sequence"  # anything before hello, or a second hello


class ImsgError(Exception):
    """A refused message. Its fds have already been closed when this is raised."""

    def __init__(self, kind: ImsgErrorKind, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind
        self.detail = detail
