"""QEMU argv builder, accelerator probe and QMP client (no guest needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from vmd_py import accel
from vmd_py.qemu import NicBackend, QemuConfigError, QemuVm, Serial, build_argv, guest_cmdline
from vmd_py.qmp import QmpClosed, QmpError, qmp_connect


def _vm(**kw: object) -> QemuVm:
    base: dict[str, object] = dict(
        name="g1", memory_mb=512, vcpus=2, kernel=Path("/k"), initrd=Path("/i"),
        cmdline="console=ttyS0", accel="tcg", qmp_path=Path("/run/q.sock"),
        serial=Serial("socket", Path("/run/c.sock")))
    base.update(kw)
    return QemuVm(**base)  # type: ignore[arg-type]


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_vhost_user_nic_and_shared_memory() -> None:
    nic = NicBackend("vhost-user", "52:54:00:00:00:01", socket_path=Path("/run/v,0.sock"),
                     device_props={"csum": False, "guest_tso4": False, "mrg_rxbuf": True})
    argv = build_argv(_vm(nics=[nic]))
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in _after(argv, "-object")
    assert _after(argv, "-machine") == ["q35,memory-backend=mem"]
    # reconnect-ms: QEMU reconnects to a restarted vionet worker.
    assert _after(argv, "-chardev")[1] == "socket,id=chr0,path=/run/v,,0.sock,reconnect-ms=500"
    assert _after(argv, "-netdev") == ["vhost-user,id=net0,chardev=chr0"]
    assert _after(argv, "-device") == [
        "virtio-net-pci,id=nic0,mac=52:54:00:00:00:01,netdev=net0,romfile=,csum=off,"
        "guest_tso4=off,mrg_rxbuf=on"]
    assert _after(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert _after(argv, "-qmp") == ["unix:/run/q.sock,server=on,wait=off"]
    assert _after(argv, "-serial") == ["chardev:ser0"]
    assert _after(argv, "-accel") == ["tcg"] and _after(argv, "-cpu") == ["qemu64"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv


def test_tap_fd_and_kvm() -> None:
    argv = build_argv(_vm(accel="kvm", nics=[NicBackend("tap", "52:54:00:00:00:02", tap_fd=7)]))
    assert _after(argv, "-netdev") == ["tap,id=net0,fd=7,script=no,downscript=no,vhost=off"]
    assert _after(argv, "-cpu") == ["host"]


@pytest.mark.parametrize("bad", [
    dict(name="a,b"), dict(memory_mb=1), dict(vcpus=0), dict(accel="hvf"),
    dict(nics=[NicBackend("none", "52:54:00:00:00:0G")]),
    dict(nics=[NicBackend("vhost-user", "52:54:00:00:00:01")]),
    dict(nics=[NicBackend("tap", "52:54:00:00:00:01")]),
    dict(nics=[NicBackend("none", "52:54:00:00:00:01", device_props={"netdev": "x"})]),
    dict(nics=[NicBackend("none", "52:54:00:00:00:01", device_props={"a,b": "x"})]),
])
def test_rejects_bad_descriptions(bad: dict[str, object]) -> None:
    with pytest.raises(QemuConfigError):
        build_argv(_vm(**bad))


def test_guest_cmdline() -> None:
    line = guest_cmdline(ip="10.0.0.2::10.0.0.1:255.255.255.0::eth0:off",
                         module_params={"virtio_net": {"csum": False, "gso": 0}})
    assert line.split() == ["console=ttyS0", "quiet", "panic=-1", "virtio_net.csum=0",
                            "virtio_net.gso=0", "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"]
    with pytest.raises(QemuConfigError):
        guest_cmdline(extra=["a b"])


def test_accel_is_tcg_on_pvm_host() -> None:
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("this check is for the PVM build machines")
    assert accel.kvm_status() == (
        "tcg", "/dev/kvm is PVM (kvm_pvm), which cannot run stock guests")
    assert accel.probe_accel() == "tcg"


def test_accel_reasons(tmp_path: Path) -> None:
    mods = tmp_path / "module"
    mods.mkdir()
    assert accel.kvm_status(tmp_path / "nokvm", mods)[0] == "tcg"
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    assert "neither" in accel.kvm_status(dev, mods)[1]
    (mods / "kvm_intel").mkdir()
    # A regular file answers the ioctl with ENOTTY: still TCG.
    assert accel.kvm_status(dev, mods) == ("tcg", "KVM_GET_API_VERSION failed: "
                                           f"{os.strerror(25)}")


async def _fake_qemu(listener: trio.SocketListener, log: list[dict[str, object]]) -> None:
    """Just enough QMP: greeting, capabilities, query-status, an error, quit."""
    stream = await listener.accept()
    async with stream:
        await stream.send_all(b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n')
        buf = b""
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                log.append(msg)
                mid, cmd = msg.get("id"), msg["execute"]
                if cmd == "quit":
                    await stream.send_all(
                        b'{"event": "SHUTDOWN", "data": {"reason": "host-qmp-quit"}}\n')
                    await stream.send_all(json.dumps({"return": {}, "id": mid}).encode() + b"\n")
                    return
                if cmd == "nope":
                    reply = {"error": {"class": "CommandNotFound", "desc": "no"}, "id": mid}
                else:
                    ret = {"status": "running", "running": True} if cmd == "query-status" else {}
                    reply = {"return": ret, "id": mid}
                await stream.send_all(
                    b'{"event": "X", "data": {}}\n' + json.dumps(reply).encode() + b"\r\n")


def test_qmp_client(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    log: list[dict[str, object]] = []

    async def main() -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_late_listen, sock, path, log)
            async with qmp_connect(path, timeout=5) as qmp:
                assert qmp.greeting["QMP"]["capabilities"] == ["oob"]
                assert (await qmp.execute("query-status"))["status"] == "running"
                with pytest.raises(QmpError) as err:
                    await qmp.execute("nope", {"a": 1})
                assert err.value.error_class == "CommandNotFound"
                assert await qmp.execute("quit") == {}
                with trio.fail_after(5):
                    ev = await qmp.wait_event("SHUTDOWN")
                assert ev["data"]["reason"] == "host-qmp-quit"
                with trio.fail_after(5):
                    while not qmp.closed:
                        await trio.sleep(0.01)
                with pytest.raises(QmpClosed):
                    await qmp.execute("query-status")

    trio.run(main)
    assert [m["execute"] for m in log] == ["qmp_capabilities", "query-status", "nope", "quit"]
    assert log[2]["arguments"] == {"a": 1}


async def _late_listen(sock: trio.socket.SocketType, path: Path,
                       log: list[dict[str, object]]) -> None:
    # The client must retry until the socket exists, as it does while QEMU starts.
    await trio.sleep(0.2)
    await sock.bind(str(path))
    sock.listen(1)
    async with trio.SocketListener(sock) as listener:
        await _fake_qemu(listener, log)
