"""The default guest image: contents, caching, rebuild on changed inputs."""

from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmd_py import guest_image as gi

LIBDIR = "lib/x86_64-linux-gnu"

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")


@pytest.fixture(scope="module")
def image() -> gi.GuestImage:
    return gi.ensure_guest_image()


@pytest.fixture(scope="module")
def entries(image: gi.GuestImage) -> dict[str, gi.CpioEntry]:
    blob = gzip.decompress(image.initrd.read_bytes())
    return {e.path: e for e in gi.read_cpio(blob)}


def _target(entries: dict[str, gi.CpioEntry], path: str) -> gi.CpioEntry:
    """Follow symlinks inside the archive."""
    for _ in range(10):
        e = entries[path]
        if not stat.S_ISLNK(e.mode):
            return e
        link = e.data.decode()
        path = link.lstrip("/") if link.startswith("/") else posixpath.join(
            posixpath.dirname(path), link)
    raise AssertionError(f"symlink loop at {path}")


def test_kernel_is_the_cloud_kernel(image: gi.GuestImage) -> None:
    assert image.version.endswith("-cloud-amd64")
    # bzImage: "HdrS" boot protocol magic at 0x202.
    assert image.kernel.read_bytes()[0x202:0x206] == b"HdrS"


def test_initrd_has_init_busybox_iperf3(entries: dict[str, gi.CpioEntry]) -> None:
    init = entries["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data == gi.init_script()
    assert _target(entries, "bin/sh").data[:4] == b"\x7fELF"
    assert _target(entries, "bin/busybox").data == entries["bin/busybox"].data
    assert entries["usr/bin/iperf3"].data[:4] == b"\x7fELF"
    assert entries["sbin/ethtool"].data[:4] == b"\x7fELF"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)


def test_every_elf_finds_its_libraries(entries: dict[str, gi.CpioEntry]) -> None:
    needed_by_iperf, interp = gi.elf_needed(entries["usr/bin/iperf3"].data)
    assert "libiperf.so.0" in needed_by_iperf
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    elves = [p for p, e in entries.items()
             if stat.S_ISREG(e.mode) and e.data[:4] == b"\x7fELF" and not p.endswith(".ko")]
    assert f"{LIBDIR}/libiperf.so.0" in elves
    assert f"{LIBDIR}/libmnl.so.0" in elves
    for path in elves:
        needed, interp = gi.elf_needed(entries[path].data)
        for soname in needed:
            assert f"{LIBDIR}/{soname}" in entries, f"{path} needs {soname}"
        if interp is not None:
            assert _target(entries, interp.lstrip("/")).data[:4] == b"\x7fELF"
    # Only what is needed: no libssl unless something links it.
    linked = {s for p in elves for s in gi.elf_needed(entries[p].data)[0]}
    shipped = {posixpath.basename(p) for p in elves if p.startswith(LIBDIR)}
    assert shipped - linked <= {"ld-linux-x86-64.so.2"}


def test_modules_in_dependency_order(image: gi.GuestImage,
                                     entries: dict[str, gi.CpioEntry]) -> None:
    moddir = f"lib/modules/{image.version}"
    order = entries[f"{moddir}/vmd.load-order"].data.decode().split()
    names = [posixpath.basename(p)[:-3].replace("-", "_") for p in order]
    for wanted in ("virtio_net", "virtio_pci", "button", "evdev", "net_failover", "failover"):
        assert wanted in names
    for rel, name in zip(order, names, strict=True):
        data = entries[f"{moddir}/{rel}"].data
        info = gi.modinfo(data)
        assert info["name"] == [name]
        for dep in (d for v in info.get("depends", []) for d in v.split(",") if d):
            assert names.index(dep.replace("-", "_")) < names.index(name), (dep, name)
    moddep = entries[f"{moddir}/modules.dep"].data.decode()
    line = next(ln for ln in moddep.splitlines() if ln.startswith("kernel/drivers/net/virtio_net"))
    assert "net_failover.ko" in line and "failover.ko" in line


def test_second_call_reuses_cache(image: gi.GuestImage,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = image.initrd.stat().st_mtime_ns, image.kernel.stat().st_mtime_ns
    again = gi.ensure_guest_image()
    assert again == image
    assert (again.initrd.stat().st_mtime_ns, again.kernel.stat().st_mtime_ns) == before
    assert "guest-image: up to date" in capsys.readouterr().err


@pytest.fixture
def cache_copy(image: gi.GuestImage, tmp_path: Path) -> Iterator[Path]:
    """A private cache holding the same .debs (hard links) and image."""
    src = image.initrd.parent.parent
    dst = tmp_path / "cache"
    shutil.copytree(src / "debs", dst / "debs", copy_function=os.link)
    shutil.copytree(src / "image", dst / "image")
    yield dst


def test_changed_init_rebuilds(image: gi.GuestImage, cache_copy: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert gi.ensure_guest_image(cache_copy).key == image.key
    changed = gi.init_script() + b"# changed\n"
    monkeypatch.setattr(gi, "init_script", lambda: changed)
    rebuilt = gi.ensure_guest_image(cache_copy)
    err = capsys.readouterr().err
    assert "building" in err and "downloading" not in err
    assert rebuilt.key != image.key
    blob = gzip.decompress(rebuilt.initrd.read_bytes())
    assert next(e for e in gi.read_cpio(blob) if e.path == "init").data == changed
    assert gi.ensure_guest_image(cache_copy).key == rebuilt.key
    assert "up to date" in capsys.readouterr().err
    monkeypatch.undo()
    # Back to the real /init: the private cache rebuilds, the default one never did.
    assert gi.ensure_guest_image(cache_copy).key == image.key
    assert gi.ensure_guest_image().key == image.key


def test_cli_prints_paths(image: gi.GuestImage, capsys: pytest.CaptureFixture[str]) -> None:
    assert gi.main([]) == 0
    assert capsys.readouterr().out.split() == [str(image.kernel), str(image.initrd)]


def test_elf_reader_rejects_non_elf() -> None:
    with pytest.raises(gi.GuestImageError):
        gi.elf_needed(b"#!/bin/sh\n" + bytes(100))


_paths = st.text(alphabet="abcdefghij/._-", min_size=1, max_size=30).filter(
    lambda p: p != "TRAILER!!!")


@settings(max_examples=50)
@given(st.lists(st.tuples(_paths, st.binary(max_size=300)), max_size=8))
def test_cpio_roundtrip(items: list[tuple[str, bytes]]) -> None:
    written = [gi.CpioEntry(p, 0o100644, d) for p, d in items]
    blob = gi.write_cpio(written)
    assert len(blob) % 512 == 0
    assert list(gi.read_cpio(blob)) == written


def test_cpio_matches_system_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    import subprocess

    blob = gi.write_cpio([gi.CpioEntry("d", 0o040755), gi.CpioEntry("d/f", 0o100600, b"hi\n"),
                          gi.CpioEntry("d/l", 0o120777, b"f")])
    subprocess.run(["cpio", "-id", "--quiet"], input=blob, cwd=tmp_path, check=True)
    assert (tmp_path / "d/f").read_bytes() == b"hi\n"
    assert os.readlink(tmp_path / "d/l") == "f"
