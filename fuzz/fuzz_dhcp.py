"""Fuzz vionet's DHCP responder with frames from a hostile guest: answer() never raises,
never takes its "parsing slip" fallback (every bound is meant to be checked before use), and
every reply is a well-formed DHCP frame for this guest with correct checksums."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import _fuzzlib  # first: puts the repository on sys.path
import atheris  # type: ignore[import-untyped]
from _formats import DHCP_FIX_IP_CSUM, DHCP_FIX_LENGTHS, DHCP_HOSTNAME, DHCP_MEMORYVIEW, DhcpCase
from _fuzzlib import check

with atheris.instrument_imports(include=["vionet.dhcp"]):
    from vionet import csum
    from vionet.counters import Counters
    from vionet.dhcp import (
        BOOTP_FIXED,
        CLIENT_PORT,
        ETH_HLEN,
        MAGIC_COOKIE,
        MAX_FRAME,
        SERVER_PORT,
        DhcpDrop,
        DhcpResponder,
        LocalLink,
    )

# Shared with make_corpus.py: the seeds are requests from this guest.
GUEST_MAC = bytes.fromhex("fee1bad00100")
LINK = LocalLink(guest=IPv4Address("100.64.1.3"), host=IPv4Address("100.64.1.2"))
_MALFORMED = f"dhcp_drop_{DhcpDrop.MALFORMED.value}"


def fix_up(frame: bytes, flags: int) -> bytes:
    """Make lengths and the IP header checksum agree with the frame, as flags ask."""
    buf = bytearray(frame)
    if len(buf) < ETH_HLEN + 20:
        return frame
    ihl = (buf[ETH_HLEN] & 0x0F) * 4
    if flags & DHCP_FIX_LENGTHS and ihl >= 20 and len(buf) >= ETH_HLEN + ihl + 8:
        total = min(len(buf) - ETH_HLEN, 0xFFFF)
        struct.pack_into("!H", buf, ETH_HLEN + 2, total)
        struct.pack_into("!H", buf, ETH_HLEN + ihl + 4, max(total - ihl, 0))
    if flags & DHCP_FIX_IP_CSUM and ihl >= 20 and len(buf) >= ETH_HLEN + ihl:
        struct.pack_into("!H", buf, ETH_HLEN + 10, 0)
        header = bytes(buf[ETH_HLEN : ETH_HLEN + ihl])
        struct.pack_into("!H", buf, ETH_HLEN + 10, csum.checksum(header))
    return bytes(buf)


def _check_reply(reply: bytes, request: bytes) -> None:
    check(ETH_HLEN + 20 + 8 + BOOTP_FIXED + 4 < len(reply) <= MAX_FRAME, "reply size")
    check(reply[:6] in (GUEST_MAC, b"\xff" * 6), "reply to someone else's MAC")
    check(reply[12:14] == b"\x08\x00" and reply[ETH_HLEN] == 0x45, "reply IP header")
    ip = reply[ETH_HLEN : ETH_HLEN + 20]
    check(csum.sum_mod(ip) == 0, "reply IP checksum")
    total = struct.unpack_from("!H", ip, 2)[0]
    check(ETH_HLEN + total == len(reply), "reply IP length")
    check(ip[12:16] == LINK.host.packed, "reply source address")
    check(csum.verify(reply) is True, "reply UDP checksum")
    sport, dport, ulen = struct.unpack_from("!HHH", reply, ETH_HLEN + 20)
    check((sport, dport, ulen) == (SERVER_PORT, CLIENT_PORT, total - 20), "reply UDP header")
    bootp = reply[ETH_HLEN + 28 :]
    req_bootp_xid = request[ETH_HLEN + (request[ETH_HLEN] & 0x0F) * 4 + 8 + 4 :][:4]
    check(bootp[0] == 2 and bootp[4:8] == req_bootp_xid, "reply op/xid")
    check(bootp[28:34] == GUEST_MAC, "reply chaddr")
    check(bootp[16:20] in (LINK.guest.packed, b"\0" * 4), "reply yiaddr")
    check(bootp[BOOTP_FIXED : BOOTP_FIXED + 4] == MAGIC_COOKIE, "reply cookie")


def test_one_input(data: bytes) -> None:
    case = DhcpCase.parse(data)
    frame = fix_up(case.frame, case.flags)
    counters = Counters()
    hostname = "guest1" if case.flags & DHCP_HOSTNAME else None
    responder = DhcpResponder(GUEST_MAC, LINK, counters, hostname=hostname)
    reply = responder.answer(memoryview(frame) if case.flags & DHCP_MEMORYVIEW else frame)
    check(counters[_MALFORMED] == 0, "a parsing slip reached answer()'s fallback")
    check(counters["dhcp_requests"] == 1, "request not counted")
    if reply is None:
        drops = [k for k, v in counters.snapshot().items() if v and k.startswith("dhcp_")]
        check(len(drops) == 2, f"no reply and no single reason: {drops}")
        return
    _check_reply(reply, frame)


if __name__ == "__main__":
    _fuzzlib.main("dhcp", test_one_input, max_len=MAX_FRAME + 64)
