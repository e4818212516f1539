"""Build the fuzzers' seed corpora (fuzz/corpus/<target>/) from valid inputs.

Seeds are the messages, rings, frames and files the unit tests use, in the byte layouts of
_formats.py; each file is named by its SHA-1, as libFuzzer names its own. Re-running rewrites
the directories from scratch, so the corpus is a pure function of this script.

    .venv/bin/python fuzz/make_corpus.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _formats as F
from _fuzzlib import CORPUS_DIR, ROOT

from imsg import catalogue
from imsg.catalogue import CATALOGUE, Kind, MsgType
from imsg.codec import Imsg, encode
from tests.virtio_harness import FakeDriver, make_memory
from vionet import csum, vhost_user
from vionet.vhost_user import (
    FLAG_NEED_REPLY,
    VERSION,
    MemRegion,
    MemTable,
    Request,
    VringAddr,
    VringFile,
    VringState,
)
from vionet.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmd_py.virtio_defs import NetF, VnetGso

# --- imsg ---------------------------------------------------------------------------------

_SAMPLE: dict[Kind, Any] = {
    Kind.U8: 7,
    Kind.U16: 700,
    Kind.U32: 70000,
    Kind.U64: 2**40 + 1,
    Kind.BOOL: True,
    Kind.NAME: "vm1",
    Kind.TEXT: "hello, world",
    Kind.COUNTERS: {"rx_packets": 5, "tx_drop_runt": 2**63},
    Kind.STRMAP: {"seccomp": "ok", "tun": "denied"},
    Kind.DOC: {"memory": 512, "disks": ["/var/vm/a.img"], "nic": {"mac": None, "up": True}},
}


def imsg_seeds() -> Iterator[bytes]:
    for msg_type in MsgType:
        spec = CATALOGUE[msg_type]
        full = {name: _SAMPLE[kind] for name, kind in spec.fields.items()}
        required = {k: v for k, v in full.items() if k not in spec.optional}
        lists = [
            k + 1
            for k, name in enumerate(F.IMSG_ALLOW_LISTS)
            if msg_type in getattr(catalogue, name)
        ]
        for payload in (full, required) if spec.optional else (full,):
            data = encode(Imsg(msg_type, payload, [], peerid=3, pid=1234))
            yield F.ImsgCase(0, 0, data).pack()
            for sel in lists[:1]:
                yield F.ImsgCase(0, sel, data).pack()
    hello = encode(Imsg(MsgType.HELLO, {"version": 1, "role": "vionet"}))
    yield F.ImsgCase(0, 0, hello[:10]).pack()  # truncated
    yield F.ImsgCase(1, 0, hello).pack()  # fds where none belong


# --- vhost-user ---------------------------------------------------------------------------


def _vhost_messages() -> Iterator[tuple[bytes, int]]:
    """(encoded request, fds it carries), QEMU's start sequence and then some."""
    enc = vhost_user.encode
    need = VERSION | FLAG_NEED_REPLY
    for req in (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                Request.SET_OWNER, Request.RESET_OWNER, Request.RESET_DEVICE):
        yield enc(req), 0
    offered = int(NetF.VERSION_1 | NetF.CSUM | NetF.GUEST_CSUM | NetF.MRG_RXBUF)
    yield enc(Request.SET_FEATURES, offered), 0
    yield enc(Request.SET_PROTOCOL_FEATURES, 0x3, flags=need), 0
    yield enc(Request.SEND_RARP, 0x5254_0012_3456), 0
    region = MemRegion(0, 4 << 20, 0x7F00_0000_0000, 0)
    yield enc(Request.SET_MEM_TABLE, MemTable((region,))), 1
    two = (MemRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
           MemRegion(0x100000, 0x300000, 0x7F00_0010_0000, 0x100000))
    yield enc(Request.SET_MEM_TABLE, MemTable(two), flags=need), 2
    for index in (0, 1):
        yield enc(Request.SET_VRING_NUM, VringState(index, 256)), 0
        yield enc(Request.SET_VRING_BASE, VringState(index, 0)), 0
        yield enc(Request.GET_VRING_BASE, VringState(index, 0)), 0
        yield enc(Request.SET_VRING_ENABLE, VringState(index, 1)), 0
        addr = VringAddr(index, 0, 0x7F00_003C_0000, 0x7F00_003C_2000, 0x7F00_003C_1000, 0)
        yield enc(Request.SET_VRING_ADDR, addr), 0
        for req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            yield enc(req, VringFile(index, False)), 1
            yield enc(req, VringFile(index, True)), 0


def vhost_seeds() -> Iterator[bytes]:
    msgs = list(_vhost_messages())
    for data, nfds in msgs:
        yield F.VhostCase(nfds, False, data).pack()
    # Streams: the fds ride with the first byte, so they belong to the first message.
    plain = b"".join(data for data, nfds in msgs if nfds == 0)
    yield F.VhostCase(0, True, plain[:2000]).pack()
    for data, nfds in msgs:
        if nfds:
            yield F.VhostCase(nfds, True, data + msgs[0][0]).pack()
    yield F.VhostCase(0, True, plain[:30]).pack()  # ends inside a message


# --- split virtqueue ----------------------------------------------------------------------


def _ring_case(
    driver: FakeDriver, bufs: list[bytearray], flags: int, **kw: int
) -> bytes:
    image = b"".join(bytes(b) for b in bufs).rstrip(b"\0")
    size = driver.size
    case = F.RingCase(
        size_log=size.bit_length() - 1,
        flags=flags,
        desc=driver.desc_gpa,
        avail=driver.avail_gpa,
        used=driver.used_gpa,
        last_avail=driver.start_idx,
        max_chain_bytes=kw.get("cap", 0),
        min_write=kw.get("min_write", 0),
        max_chains=kw.get("max_chains", 0),
        memory=image,
    )
    return case.pack()


def ring_seeds() -> Iterator[bytes]:
    for size, flags, start in (
        (4, F.RING_INDIRECT, 0),
        (16, F.RING_INDIRECT | F.RING_EVENT_IDX, 65530),
        (256, F.RING_INDIRECT | F.RING_BY_GPA, 0),
        (32, F.RING_POP_MANY | F.RING_INDIRECT, 0),
        (1, 0, 0),
    ):
        mem, bufs = make_memory(F.RING_REGIONS)
        driver = FakeDriver(mem, size, event_idx=bool(flags & F.RING_EVENT_IDX), start_idx=start)
        if size == 1:
            driver.add([b"x" * 60])
        else:
            driver.add([b"\x01" * 12, b"frame" * 20], [1500])
            driver.add([], [64, 64], indirect=True)
        if size >= 16:
            driver.add([bytes(range(40))], indirect=True)
            driver.add([], [2048])
            # A readable buffer that spans region 0 into the GPA-adjacent region 1.
            span = F.RING_REGIONS[1][0] - 16
            driver.write(span, b"S" * 32)
            d = driver.free[0]
            driver.write_desc(d, span, 32, 0)
            driver.track(d)
            driver.post(d)
            # A chain into region 2, which is not adjacent to anything.
            far = F.RING_REGIONS[2][0]
            a, b = driver.free[0], driver.free[1]
            driver.write_desc(a, far, 100, VIRTQ_DESC_F_NEXT, b)
            driver.write_desc(b, far + 0x100, 200, VIRTQ_DESC_F_WRITE)
            driver.track(a, [a, b])
            driver.post(a)
        kw = {"min_write": 3000, "max_chains": 4} if flags & F.RING_POP_MANY else {}
        yield _ring_case(driver, bufs, flags, **kw)
        yield _ring_case(driver, bufs, flags | F.RING_CAP, cap=1000, **kw)


# --- vnet headers and checksums -------------------------------------------------------------

_MAC2 = bytes.fromhex("fee1bad00100") + bytes.fromhex("525400123456")


def _ipv4(proto: int, l4: bytes, vlan: bool = False) -> bytes:
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto,
                               0, bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))))
    struct.pack_into("!H", ip, 10, csum.checksum(bytes(ip)))
    tag = b"\x81\x00\x00\x05" if vlan else b""
    return _MAC2 + tag + b"\x08\x00" + bytes(ip) + l4


def _ipv6(proto: int, l4: bytes, ext: bool = False) -> bytes:
    hop = bytes((proto, 0)) + bytes(6) if ext else b""
    nxt = 0 if ext else proto
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(hop) + len(l4), nxt, 64,
                     b"\xfd" + bytes(14) + b"\x01", b"\xfd" + bytes(14) + b"\x02")
    return _MAC2 + b"\x86\xdd" + ip + hop + l4


def _tcp(payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload


def _udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload


def _frames() -> list[bytes]:
    return [
        _ipv4(6, _tcp(b"hello tcp" * 5)),
        _ipv4(17, _udp(b"hello udp")),
        _ipv4(6, _tcp(bytes(range(256)) * 4), vlan=True),
        _ipv6(6, _tcp(b"v6 tcp" * 3)),
        _ipv6(17, _udp(b"v6 udp"), ext=True),
    ]


def _splits(frame: bytes) -> list[list[bytes]]:
    return [
        [frame],
        [frame[:14], frame[14:]],
        [frame[:1], frame[1:7], frame[7:35], b"", frame[35:]],
        [
            *(frame[k : k + 33] for k in range(0, 33 * (F.MAX_PIECES - 1), 33)),
            frame[33 * (F.MAX_PIECES - 1) :],
        ],
    ]


def _hdr(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0,
         start: int = 0, off: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, start, off, 0)


def vnet_seeds() -> Iterator[bytes]:
    acked = int(NetF.VERSION_1 | NetF.CSUM | NetF.GUEST_CSUM | NetF.HOST_TSO4
                | NetF.HOST_TSO6 | NetF.GUEST_TSO4 | NetF.GUEST_TSO6 | NetF.HOST_ECN
                | NetF.MRG_RXBUF | NetF.HOST_USO | NetF.GUEST_USO4 | NetF.GUEST_USO6)
    tap_mask = 0x7F
    for frame in _frames():
        loc = csum.l4_csum_location(frame)
        start, off = loc if loc is not None else (34, 16)
        partial = bytearray(frame)
        csum.make_partial(partial)
        hdrs = [
            _hdr(),
            _hdr(1, 0, 0, 0, start, off),
            _hdr(1, int(VnetGso.TCPV4), start + 20, 1448, start, off),
            _hdr(1, int(VnetGso.TCPV6) | 0x80, start + 20, 1440, start, off),
            _hdr(1, int(VnetGso.UDP_L4), start + 8, 1400, start, off),
            _hdr(2),
        ]
        for h in hdrs:
            yield F.pack_vnet_tx(h, len(frame), acked, 1518, as_object=False)
            yield F.pack_vnet_rx(h, acked, tap_mask, [bytes(partial)])
        yield F.pack_vnet_tx(hdrs[1][:7], len(frame), acked, 1518, as_object=False)
        yield F.pack_vnet_tx(hdrs[2], len(frame), acked, 1518, as_object=True)
        yield F.pack_vnet_rx(hdrs[1], int(NetF.VERSION_1), 0, [bytes(partial)])
        for pieces in _splits(bytes(partial)):
            yield F.pack_vnet_gather(12, 14, pieces)
            yield F.pack_vnet_csum(len(frame), start, off, pieces)
            yield F.pack_vnet_rx(hdrs[1], int(NetF.VERSION_1), 0, pieces)
        yield F.pack_vnet_l4(frame)


# --- vm.conf ------------------------------------------------------------------------------


def config_seeds() -> Iterator[bytes]:
    for path in sorted((ROOT / "tests" / "conf").rglob("*.conf")):
        yield path.read_bytes()


# --- DHCP ---------------------------------------------------------------------------------

_GUEST_MAC = bytes.fromhex("fee1bad00100")
_HOST_IP = bytes((100, 64, 1, 2))
_GUEST_IP = bytes((100, 64, 1, 3))


def _dhcp_request(msg_type: int, options: bytes = b"", *, ciaddr: bytes = bytes(4),
                  flags: int = 0, src_ip: bytes = bytes(4),
                  dst_ip: bytes = b"\xff" * 4) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, 0x1234ABCD, 0, flags, ciaddr,
                        bytes(4), bytes(4), bytes(4), _GUEST_MAC + bytes(10))
    bootp += bytes(192) + b"\x63\x82\x53\x63" + bytes((53, 1, msg_type)) + options + b"\xff"
    bootp += bytes(max(0, 300 - len(bootp)))
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                               src_ip, dst_ip))
    struct.pack_into("!H", ip, 10, csum.checksum(bytes(ip)))
    return b"\xff" * 6 + _GUEST_MAC + b"\x08\x00" + bytes(ip) + udp


def dhcp_seeds() -> Iterator[bytes]:
    requested = bytes((50, 4)) + _GUEST_IP
    server = bytes((54, 4)) + _HOST_IP
    frames = [
        _dhcp_request(1),
        _dhcp_request(1, bytes((12, 5)) + b"guest" + bytes((0, 0)), flags=0x8000),
        _dhcp_request(3, requested + server),
        _dhcp_request(3, bytes((50, 4, 10, 0, 0, 9)) + server),  # NAK
        _dhcp_request(3, ciaddr=_GUEST_IP, src_ip=_GUEST_IP, dst_ip=_HOST_IP),  # renewal
        _dhcp_request(7, server, ciaddr=_GUEST_IP, src_ip=_GUEST_IP, dst_ip=_HOST_IP),
        _dhcp_request(8),
    ]
    for frame in frames:
        yield F.DhcpCase(0, frame).pack()
        yield F.DhcpCase(F.DHCP_FIX_LENGTHS | F.DHCP_FIX_IP_CSUM | F.DHCP_HOSTNAME,
                         frame).pack()
    yield F.DhcpCase(F.DHCP_MEMORYVIEW, frames[0][:200]).pack()


TARGETS: dict[str, Callable[[], Iterator[bytes]]] = {
    "imsg": imsg_seeds,
    "vhost_user": vhost_seeds,
    "virtqueue": ring_seeds,
    "vnethdr": vnet_seeds,
    "config": config_seeds,
    "dhcp": dhcp_seeds,
}


def write_corpus(out: Path, targets: dict[str, Callable[[], Iterator[bytes]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, seeds in targets.items():
        d = out / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        unique = {hashlib.sha1(s).hexdigest(): s for s in seeds()}
        for digest, data in unique.items():
            (d / digest).write_bytes(data)
        counts[name] = len(unique)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CORPUS_DIR)
    ap.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    args = ap.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    chosen = {k: v for k, v in TARGETS.items() if not args.targets or k in args.targets}
    for name, n in write_corpus(args.out, chosen).items():
        print(f"{name}: {n} seeds in {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
