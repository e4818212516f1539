"""DHCP for a ``local interface``: vionet answers the guest itself, like vmd's dhcp.c.

The link is a /31 (host side even, guest odd), so there is exactly one address to hand out and
no state to keep: DISCOVER gets an OFFER and a REQUEST for the guest's address an ACK, every
time. Requests come straight from the guest and are hostile input: every length is checked
before it is used, and anything malformed, truncated, oversized or meant for someone else is
dropped and counted (``dhcp_drop_<reason>``) without a reply. :meth:`DhcpResponder.answer`
never raises.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from vionet import csum
from vionet.counters import Counters

ETH_HLEN = 14
MAX_FRAME = ETH_HLEN + 1500  # a DHCP request is never fragmented nor larger than the MTU
BOOTP_FIXED = 236  # op .. file: the fixed part before the options
MAGIC_COOKIE = b"\x63\x82\x53\x63"
MIN_REQUEST = ETH_HLEN + 20 + 8 + BOOTP_FIXED + len(MAGIC_COOKIE)
BOOTP_MIN_LEN = 300  # RFC 951 / 1542: old clients drop shorter replies
SERVER_PORT = 67
CLIENT_PORT = 68
LEASE_SECONDS = 86400  # finite: some clients overflow on 0xffffffff; renewals are answered too
BROADCAST_FLAG = 0x8000
MASK_31 = IPv4Address("255.255.255.254")

BROADCAST_MAC = b"\xff" * 6
BROADCAST_IP = b"\xff" * 4
ZERO_IP = b"\x00" * 4

# Option codes (RFC 2132).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_HOSTNAME = 12
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_END = 255


class MsgType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class DhcpDrop(enum.StrEnum):
    """Why a request got no reply (counter ``dhcp_drop_<value>``)."""

    SHORT = "short"
    OVERSIZED = "oversized"
    NOT_IPV4 = "not_ipv4"
    BAD_IP_HEADER = "bad_ip_header"
    FRAGMENT = "fragment"
    NOT_DHCP = "not_dhcp"
    BAD_UDP_LENGTH = "bad_udp_length"
    NOT_FOR_US = "not_for_us"
    NOT_BOOTREQUEST = "not_bootrequest"
    BAD_HARDWARE = "bad_hardware"
    BAD_COOKIE = "bad_cookie"
    BAD_OPTIONS = "bad_options"
    NO_MESSAGE_TYPE = "no_message_type"
    UNSUPPORTED_TYPE = "unsupported_type"
    MALFORMED = "malformed"


class _Dropped(Exception):
    def __init__(self, reason: DhcpDrop) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class LocalLink:
    """The /31 of one local interface: the host (tap) side and the guest side."""

    guest: IPv4Address
    host: IPv4Address


_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s")  # up to chaddr; sname and file follow (192 B)


def is_server_bound(head: bytes | memoryview) -> bool:
    """Cheap test on a frame's first bytes: untagged IPv4, UDP, from port 68 to port 67.

    Every such frame from a guest on a local interface belongs to the responder, valid or not:
    there is no other DHCP server on a /31 the daemon owns.
    """
    if len(head) < ETH_HLEN + 20 or head[12:14] != b"\x08\x00" or head[23] != 17:
        return False
    l4 = ETH_HLEN + (head[14] & 0x0F) * 4
    if len(head) < l4 + 4:
        return False
    return head[l4 : l4 + 4] == b"\x00\x44\x00\x43"


def peek_len() -> int:
    """How many leading bytes :func:`is_server_bound` may need (Ethernet + max IPv4 + ports)."""
    return ETH_HLEN + 60 + 4


@dataclass
class _Request:
    msg_type: int
    xid: int
    flags: int
    ciaddr: bytes
    chaddr: bytes
    requested: bytes | None
    server_id: bytes | None


class DhcpResponder:
    """Answers one guest NIC's DHCP requests with its /31 address."""

    def __init__(
        self,
        guest_mac: bytes,
        link: LocalLink,
        counters: Counters,
        *,
        hostname: str | None = None,
        lease: int = LEASE_SECONDS,
    ) -> None:
        if len(guest_mac) != 6:
            raise ValueError("guest MAC must be 6 bytes")
        if hostname is not None and not 0 < len(hostname.encode()) <= 63:
            raise ValueError("hostname must be 1..63 bytes")
        self.guest_mac = bytes(guest_mac)
        # The replies' Ethernet source: vmd's choice, the guest's MAC plus one (unicast kept).
        self.server_mac = self.guest_mac[:5] + bytes(((self.guest_mac[5] + 1) & 0xFF,))
        self.guest_ip = link.guest.packed
        self.host_ip = link.host.packed
        self.counters = counters
        self.hostname = hostname.encode() if hostname else None
        self.lease = lease

    def answer(self, frame: bytes | memoryview) -> bytes | None:
        """The reply frame for a request the guest sent, or None (counted) if there is none."""
        self.counters.inc("dhcp_requests")
        try:
            req = self._parse(frame)
            return self._reply(req)
        except _Dropped as exc:
            self.counters.inc(f"dhcp_drop_{exc.reason.value}")
        except (struct.error, IndexError, ValueError):
            # Every bound is checked above; this only keeps a parsing slip from killing TX.
            self.counters.inc(f"dhcp_drop_{DhcpDrop.MALFORMED.value}")
        return None

    # --- parsing ----------------------------------------------------------------------------

    def _parse(self, frame: bytes | memoryview) -> _Request:
        if len(frame) > MAX_FRAME:
            raise _Dropped(DhcpDrop.OVERSIZED)
        if len(frame) < MIN_REQUEST:
            raise _Dropped(DhcpDrop.SHORT)
        data = bytes(frame)
        dst_mac, src_mac, ethertype = data[0:6], data[6:12], data[12:14]
        if ethertype != b"\x08\x00":
            raise _Dropped(DhcpDrop.NOT_IPV4)
        if src_mac != self.guest_mac or (dst_mac[0] & 1 and dst_mac != BROADCAST_MAC):
            raise _Dropped(DhcpDrop.NOT_FOR_US)

        ver_ihl, _tos, total, _ident, frag, _ttl, proto, _sum, src_ip, dst_ip = \
            _IP.unpack_from(data, ETH_HLEN)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or ETH_HLEN + ihl > len(data):
            raise _Dropped(DhcpDrop.BAD_IP_HEADER)
        if total < ihl + 8 or ETH_HLEN + total > len(data):
            raise _Dropped(DhcpDrop.BAD_IP_HEADER)
        if csum.sum_mod(data[ETH_HLEN : ETH_HLEN + ihl]) != 0:
            raise _Dropped(DhcpDrop.BAD_IP_HEADER)
        if frag & 0x3FFF:  # MF or an offset
            raise _Dropped(DhcpDrop.FRAGMENT)
        if proto != 17:
            raise _Dropped(DhcpDrop.NOT_DHCP)
        if dst_ip not in (BROADCAST_IP, self.host_ip) or src_ip not in (ZERO_IP, self.guest_ip):
            raise _Dropped(DhcpDrop.NOT_FOR_US)

        l4 = ETH_HLEN + ihl
        sport, dport, ulen, _usum = _UDP.unpack_from(data, l4)
        if sport != CLIENT_PORT or dport != SERVER_PORT:
            raise _Dropped(DhcpDrop.NOT_DHCP)
        # The UDP checksum is not checked: a renewal from a UDP socket may carry a partial one
        # (NEEDS_CSUM). The IP header checksum above is always complete.
        if ulen != total - ihl:
            raise _Dropped(DhcpDrop.BAD_UDP_LENGTH)
        bootp = data[l4 + 8 : l4 + ulen]
        if len(bootp) < BOOTP_FIXED + len(MAGIC_COOKIE):
            raise _Dropped(DhcpDrop.SHORT)

        op, htype, hlen, hops, xid, _secs, flags, ciaddr, _yi, _si, giaddr, chaddr = \
            _BOOTP.unpack_from(bootp, 0)
        if op != 1:
            raise _Dropped(DhcpDrop.NOT_BOOTREQUEST)
        if htype != 1 or hlen != 6:
            raise _Dropped(DhcpDrop.BAD_HARDWARE)
        if chaddr[:6] != self.guest_mac or hops != 0 or giaddr != ZERO_IP:
            raise _Dropped(DhcpDrop.NOT_FOR_US)
        if ciaddr not in (ZERO_IP, self.guest_ip):
            raise _Dropped(DhcpDrop.NOT_FOR_US)
        if bootp[BOOTP_FIXED : BOOTP_FIXED + 4] != MAGIC_COOKIE:
            raise _Dropped(DhcpDrop.BAD_COOKIE)

        options = _parse_options(bootp, BOOTP_FIXED + 4)
        mtype = options.get(OPT_MESSAGE_TYPE)
        if mtype is None:
            raise _Dropped(DhcpDrop.NO_MESSAGE_TYPE)
        requested = options.get(OPT_REQUESTED_IP)
        server_id = options.get(OPT_SERVER_ID)
        if len(mtype) != 1 or (requested is not None and len(requested) != 4) or (
            server_id is not None and len(server_id) != 4
        ):
            raise _Dropped(DhcpDrop.BAD_OPTIONS)
        return _Request(mtype[0], xid, flags, ciaddr, chaddr, requested, server_id)

    # --- replying ---------------------------------------------------------------------------

    def _reply(self, req: _Request) -> bytes | None:
        if req.msg_type == MsgType.DISCOVER:
            return self._build(req, MsgType.OFFER)
        if req.msg_type == MsgType.REQUEST:
            if req.server_id is not None and req.server_id != self.host_ip:
                # The guest chose another server's offer: not ours to answer.
                raise _Dropped(DhcpDrop.NOT_FOR_US)
            wanted = req.requested if req.requested is not None else req.ciaddr
            if wanted == self.guest_ip:
                return self._build(req, MsgType.ACK)
            return self._build(req, MsgType.NAK)
        if req.msg_type in (MsgType.DECLINE, MsgType.RELEASE, MsgType.INFORM):
            # Nothing to do with a fixed address; a decline would only loop the client.
            self.counters.inc(f"dhcp_ignored_{MsgType(req.msg_type).name.lower()}")
            return None
        raise _Dropped(DhcpDrop.UNSUPPORTED_TYPE)

    def _build(self, req: _Request, mtype: MsgType) -> bytes:
        nak = mtype is MsgType.NAK
        opts = bytearray((OPT_MESSAGE_TYPE, 1, int(mtype), OPT_SERVER_ID, 4))
        opts += self.host_ip
        if not nak:
            opts += bytes((OPT_LEASE_TIME, 4)) + struct.pack("!I", self.lease & 0xFFFFFFFF)
            opts += bytes((OPT_SUBNET_MASK, 4)) + MASK_31.packed
            opts += bytes((OPT_ROUTER, 4)) + self.host_ip
            if self.hostname is not None:
                opts += bytes((OPT_HOSTNAME, len(self.hostname))) + self.hostname
        opts.append(OPT_END)

        bootp = bytearray(_BOOTP.pack(
            2, 1, 6, 0, req.xid, 0, req.flags & BROADCAST_FLAG,
            req.ciaddr if mtype is MsgType.ACK else ZERO_IP,
            ZERO_IP if nak else self.guest_ip,
            ZERO_IP, ZERO_IP, req.chaddr,
        ))
        bootp += bytes(192)  # sname, file
        bootp += MAGIC_COOKIE + opts
        if len(bootp) < BOOTP_MIN_LEN:
            bootp += bytes(BOOTP_MIN_LEN - len(bootp))

        # RFC 2131 4.1: a NAK, or a client that asked for it, gets broadcast.
        broadcast = nak or bool(req.flags & BROADCAST_FLAG)
        dst_mac = BROADCAST_MAC if broadcast else self.guest_mac
        dst_ip = BROADCAST_IP if broadcast else self.guest_ip

        ulen = 8 + len(bootp)
        pseudo = self.host_ip + dst_ip + struct.pack("!BBH", 0, 17, ulen)
        udp = bytearray(_UDP.pack(SERVER_PORT, CLIENT_PORT, ulen, 0)) + bootp
        struct.pack_into("!H", udp, 6, csum.checksum(pseudo + bytes(udp)))
        ip = bytearray(_IP.pack(0x45, 0, 20 + ulen, 0, 0, 64, 17, 0, self.host_ip, dst_ip))
        struct.pack_into("!H", ip, 10, csum.checksum(bytes(ip)))
        self.counters.inc(f"dhcp_{mtype.name.lower()}s")
        return dst_mac + self.server_mac + b"\x08\x00" + bytes(ip) + bytes(udp)


def _parse_options(bootp: bytes, start: int) -> dict[int, bytes]:
    """Options up to END; a length past the end, or no END, is malformed. Repeated options are
    concatenated (RFC 3396), so a repeated fixed-size option fails its length check."""
    options: dict[int, bytes] = {}
    i, end = start, len(bootp)
    while True:
        if i >= end:
            raise _Dropped(DhcpDrop.BAD_OPTIONS)  # no END
        code = bootp[i]
        if code == OPT_END:
            return options
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= end:
            raise _Dropped(DhcpDrop.BAD_OPTIONS)
        length = bootp[i + 1]
        if i + 2 + length > end:
            raise _Dropped(DhcpDrop.BAD_OPTIONS)
        options[code] = options.get(code, b"") + bootp[i + 2 : i + 2 + length]
        i += 2 + length
