"""The message catalogue: every type, its payload schema, its fd count, and its result.

A schema is a mapping of field name to a :class:`Kind`; payloads are msgpack maps with exactly
those keys (optional fields may be absent). Keeping it as data lets the decoder, the docs and the
fuzzers share one source of truth.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1


class Kind(enum.Enum):
    U8 = "u8"
    U16 = "u16"
    U32 = "u32"
    U64 = "u64"
    BOOL = "bool"
    NAME = "name"  # str, <= 64 chars
    TEXT = "text"  # str, <= 4096 chars
    COUNTERS = "counters"  # map str(<=64) -> u64, <= 256 entries
    STRMAP = "strmap"  # map str(<=64) -> str(<=256), <= 256 entries
    DOC = "doc"  # any msgpack map (bounded only by the datagram): parent-made documents only


class MsgType(enum.IntEnum):
    HELLO = 1
    ERROR = 2
    OK = 3
    # vionet -> parent: apply this offload mask to my tap (OpenBSD's VIODEV_MSG_TUNSCAP).
    TUNSCAP = 10
    TUNSCAP_RESULT = 11
    # parent -> vionet: report counters and negotiation.
    STATS_REQUEST = 12
    STATS = 13
    # parent -> vionet: try the operations the sandbox must forbid and report (audit).
    PROBE_SANDBOX = 20
    PROBE_RESULT = 21
    # parent -> vionet: stop / resume polling the tap and the queues (vmctl pause).
    PAUSE = 30
    RESUME = 31
    # vmctl -> control -> parent (control adds the client's uid/gid from SO_PEERCRED).
    CTL_START = 40
    CTL_STOP = 41
    CTL_STATUS = 42
    CTL_PAUSE = 43
    CTL_UNPAUSE = 44
    CTL_WAIT = 45
    CTL_RELOAD = 46
    CTL_LOAD = 47
    CTL_RESET = 48
    CTL_LOG = 49
    CTL_CONSOLE = 50
    CTL_RESULT = 60
    CTL_STATUS_RESULT = 61


@dataclass(frozen=True)
class Spec:
    fields: Mapping[str, Kind]
    optional: frozenset[str] = field(default_factory=frozenset)
    fds: int = 0  # exact number of fds the type carries
    result: MsgType | None = None  # the type that answers it (ERROR may answer any request)


def _ctl(
    fields: Mapping[str, Kind],
    optional: set[str] | None = None,
    result: MsgType = MsgType.CTL_RESULT,
) -> Spec:
    """A vmctl request: the client's credentials ride along, filled in by the control process
    from SO_PEERCRED (whatever the client put there is overwritten)."""
    return Spec(
        {**fields, "uid": Kind.U32, "gid": Kind.U32},
        frozenset((optional or set()) | {"uid", "gid"}),
        result=result,
    )


CATALOGUE: Mapping[MsgType, Spec] = {
    MsgType.HELLO: Spec({"version": Kind.U32, "role": Kind.NAME}),
    MsgType.ERROR: Spec({"code": Kind.NAME, "detail": Kind.TEXT, "request": Kind.U32}),
    MsgType.OK: Spec({}),
    MsgType.TUNSCAP: Spec(
        {"mask": Kind.U32, "features": Kind.U64}, result=MsgType.TUNSCAP_RESULT
    ),
    MsgType.TUNSCAP_RESULT: Spec({"mask": Kind.U32}),
    MsgType.STATS_REQUEST: Spec({}, result=MsgType.STATS),
    MsgType.STATS: Spec(
        {
            "features_offered": Kind.U64,
            "features_acked": Kind.U64,
            "tap_offload": Kind.U32,
            "paused": Kind.BOOL,
            "counters": Kind.COUNTERS,
        }
    ),
    MsgType.PROBE_SANDBOX: Spec({}, result=MsgType.PROBE_RESULT),
    MsgType.PROBE_RESULT: Spec({"results": Kind.STRMAP}),
    MsgType.PAUSE: Spec({}, result=MsgType.OK),
    MsgType.RESUME: Spec({}, result=MsgType.OK),
    MsgType.CTL_START: _ctl({"name": Kind.NAME, "options": Kind.DOC}, optional={"options"}),
    MsgType.CTL_STOP: _ctl(
        {"name": Kind.NAME, "force": Kind.BOOL, "wait": Kind.BOOL, "all": Kind.BOOL}
    ),
    MsgType.CTL_STATUS: _ctl({"name": Kind.NAME}, result=MsgType.CTL_STATUS_RESULT),
    MsgType.CTL_PAUSE: _ctl({"name": Kind.NAME}),
    MsgType.CTL_UNPAUSE: _ctl({"name": Kind.NAME}),
    MsgType.CTL_WAIT: _ctl({"name": Kind.NAME}),
    MsgType.CTL_RELOAD: _ctl({}),
    MsgType.CTL_LOAD: _ctl({"path": Kind.TEXT}),
    MsgType.CTL_RESET: _ctl({"what": Kind.NAME}),
    MsgType.CTL_LOG: _ctl({"verbose": Kind.BOOL}),
    MsgType.CTL_CONSOLE: _ctl({"name": Kind.NAME}),
    MsgType.CTL_RESULT: Spec({"ok": Kind.BOOL, "code": Kind.U32, "message": Kind.TEXT}),
    MsgType.CTL_STATUS_RESULT: Spec({"vms": Kind.DOC}),
}

# What each side may receive. Anything else is refused as NOT_ALLOWED and counted.
PARENT_FROM_VIONET = frozenset(
    {MsgType.HELLO, MsgType.ERROR, MsgType.OK, MsgType.TUNSCAP, MsgType.STATS,
     MsgType.PROBE_RESULT}
)
VIONET_FROM_PARENT = frozenset(
    {MsgType.HELLO, MsgType.ERROR, MsgType.TUNSCAP_RESULT, MsgType.STATS_REQUEST,
     MsgType.PROBE_SANDBOX, MsgType.PAUSE, MsgType.RESUME}
)


CTL_REQUESTS = frozenset(
    t for t in MsgType if t.name.startswith("CTL_") and CATALOGUE[t].result is not None
)
# The control process hears vmctl's requests; the parent hears them from the control process;
# vmctl hears only results.
CONTROL_FROM_CLIENT = CTL_REQUESTS
PARENT_FROM_CONTROL = CTL_REQUESTS | {MsgType.HELLO, MsgType.ERROR}
CONTROL_FROM_PARENT = frozenset(
    {MsgType.HELLO, MsgType.ERROR, MsgType.CTL_RESULT, MsgType.CTL_STATUS_RESULT}
)
CLIENT_FROM_CONTROL = frozenset({MsgType.ERROR, MsgType.CTL_RESULT, MsgType.CTL_STATUS_RESULT})


def result_type_for(request: MsgType) -> MsgType | None:
    return CATALOGUE[request].result
