"""imsg: OpenBSD-style typed messages over SOCK_SEQPACKET with fd passing.

One message per datagram: a 16-byte header (see :mod:`imsg.header`), a msgpack payload, and
file descriptors in SCM_RIGHTS. Both ends of every channel treat the other as hostile: every
receive is bounded in size and fd count, checked against a per-channel allow-list and a typed
schema, and anything malformed raises :class:`ImsgError` after its fds are closed.
"""

from imsg.catalogue import PROTOCOL_VERSION, MsgType, result_type_for
from imsg.channel import ImsgSocket, TrioImsgChannel
from imsg.codec import Imsg, decode, encode
from imsg.errors import ImsgError, ImsgErrorKind

__all__ = [
    "PROTOCOL_VERSION",
    "Imsg",
    "ImsgError",
    "ImsgErrorKind",
    "ImsgSocket",
    "MsgType",
    "TrioImsgChannel",
    "decode",
    "encode",
    "result_type_for",
]
