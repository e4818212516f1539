"""Build the default guest (kernel + initramfs) from Debian packages, cached.

Inputs: the Debian cloud kernel, busybox-static, iperf3 and exactly the shared
libraries its binaries need (found by reading ELF DT_NEEDED), plus /init from
guest_init.sh. Output: ``vmlinuz``, ``initrd.gz`` (newc cpio, gzip) and a
``manifest.json`` under ``<cache>/image``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import os
import posixpath
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = "3"
DEFAULT_CACHE = Path("/var/cache/vmd-py/guest")
KERNEL_META = "linux-image-cloud-amd64"
# Dynamically linked programs in the guest: package -> path inside it. Their
# libraries are found by following DT_NEEDED, not by copying the host's.
PROGRAMS = {"iperf3": "usr/bin/iperf3", "ethtool": "sbin/ethtool"}
ROOT_PACKAGES = ("busybox-static", *PROGRAMS)
# Modules /init loads, in dependency order, together with what they need.
WANTED_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "button", "evdev")
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
GUEST_LIBDIR = "lib/x86_64-linux-gnu"
INIT_NAME = "guest_init.sh"
APT_OPTS = ("-o", "APT::Sandbox::User=root", "-q")


class GuestImageError(RuntimeError):
    """The guest image cannot be built."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    version: str  # kernel release, e.g. 6.1.0-56-cloud-amd64
    key: str  # hash of every input; changes whenever a rebuild happens
    manifest: Path


def log(msg: str) -> None:
    print(f"guest-image: {msg}", file=sys.stderr, flush=True)


# --- ELF --------------------------------------------------------------------

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_DYN = struct.Struct("<qQ")
_SHT_DYNAMIC = 6
_DT_NEEDED = 1


def _sections(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, offset, size, link) of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestImageError("not a little-endian ELF64 file")
    eh = _EHDR.unpack_from(data, 0)
    shoff, shentsize, shnum, shstrndx = eh[6], eh[11], eh[12], eh[13]
    raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = raw[shstrndx][4]
    out: dict[str, tuple[int, int, int, int]] = {}
    for idx, sh in enumerate(raw):
        entry = (sh[1], sh[4], sh[5], sh[6])
        out[f"#{idx}"] = entry
        out.setdefault(_cstr(data, strtab_off + sh[0]), entry)
    return out


def _cstr(data: bytes, off: int) -> str:
    end = data.index(b"\0", off)
    return data[off:end].decode()


def elf_needed(data: bytes) -> tuple[list[str], str | None]:
    """DT_NEEDED sonames and the program interpreter (PT_INTERP) of an ELF64 file."""
    secs = _sections(data)
    interp = None
    if ".interp" in secs:
        _, off, size, _ = secs[".interp"]
        interp = data[off : off + size].rstrip(b"\0").decode()
    needed: list[str] = []
    dyn = [s for s in secs.values() if s[0] == _SHT_DYNAMIC]
    if dyn:
        _, off, size, link = dyn[0]
        stroff = secs[f"#{link}"][1]
        for pos in range(off, off + size, _DYN.size):
            tag, val = _DYN.unpack_from(data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                needed.append(_cstr(data, stroff + val))
    return needed, interp


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The .modinfo key=value strings of a kernel module."""
    secs = _sections(data)
    if ".modinfo" not in secs:
        raise GuestImageError("kernel module without .modinfo")
    _, off, size, _ = secs[".modinfo"]
    info: dict[str, list[str]] = collections.defaultdict(list)
    for item in data[off : off + size].split(b"\0"):
        if b"=" in item:
            k, _, v = item.decode(errors="replace").partition("=")
            info[k].append(v)
    return dict(info)


# --- cpio -------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    path: str  # without leading slash
    mode: int  # full st_mode (type bits included)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """A reproducible newc archive: uid/gid 0, mtime 0, sequential inodes."""
    out = bytearray()

    def add(ino: int, e: CpioEntry) -> None:
        name = e.path.encode() + b"\0"
        nlink = 2 if (e.mode & 0o170000) == 0o040000 else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                  len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(e.data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, e in enumerate(entries, start=1):
        add(ino, e)
    add(0, CpioEntry("TRAILER!!!", 0))
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def read_cpio(blob: bytes) -> Iterator[CpioEntry]:
    """Entries of a newc archive (the inverse of write_cpio, for tests and checks)."""
    pos = 0
    while True:
        if blob[pos : pos + 6] != b"070701":
            raise GuestImageError(f"bad cpio magic at {pos}")
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = blob[pos : pos + namesize - 1].decode()
        pos += namesize + (-(pos + namesize) % 4)
        data = blob[pos : pos + size]
        pos += size + (-(pos + size) % 4)
        if name == "TRAILER!!!":
            return
        yield CpioEntry(name, mode, data, (rmaj, rmin))


# --- apt --------------------------------------------------------------------


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestImageError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class PkgInfo:
    name: str
    version: str
    depends: tuple[str, ...]  # first alternative of each Pre-Depends/Depends


def apt_show(names: Iterable[str]) -> dict[str, PkgInfo]:
    """Candidate version and dependencies of each package (one apt-cache call)."""
    names = list(dict.fromkeys(names))
    text = _run(["apt-cache", "show", "--no-all-versions", *names])
    out: dict[str, PkgInfo] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = ""
        for line in stanza.splitlines():
            if line[:1].isspace() and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if "Package" not in fields:
            continue
        deps: list[str] = []
        for field in ("Pre-Depends", "Depends"):
            for alt in filter(None, (d.strip() for d in fields.get(field, "").split(","))):
                deps.append(alt.split("|")[0].split("(")[0].split(":")[0].strip())
        out.setdefault(fields["Package"], PkgInfo(fields["Package"], fields["Version"],
                                                  tuple(deps)))
    missing = [n for n in names if n not in out]
    if missing:
        raise GuestImageError(f"no candidate for package(s): {', '.join(missing)}")
    return out


def kernel_package() -> str:
    """The versioned kernel package the cloud metapackage currently points at."""
    return _kernel_dep(apt_show([KERNEL_META])[KERNEL_META])


def _kernel_dep(meta: PkgInfo) -> str:
    for dep in meta.depends:
        if dep.startswith("linux-image-") and dep != KERNEL_META:
            return dep
    raise GuestImageError(f"{KERNEL_META} does not depend on a kernel image")


def download(pkg: PkgInfo, debs: Path) -> Path:
    """The .deb of exactly pkg.version, fetched with apt-get download if not cached."""
    quoted = pkg.version.replace(":", "%3a")
    found = sorted(debs.glob(f"{pkg.name}_{quoted}_*.deb"))
    if not found:
        log(f"downloading {pkg.name} {pkg.version}")
        _run(["apt-get", *APT_OPTS, "download", f"{pkg.name}={pkg.version}"], cwd=debs)
        found = sorted(debs.glob(f"{pkg.name}_{quoted}_*.deb"))
    if not found:
        raise GuestImageError(f"apt-get download left no .deb for {pkg.name}")
    return found[0]


def extract(deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def resolve_in_root(root: Path, rel: str) -> Path:
    """Follow symlinks inside an extracted package tree (absolute targets re-rooted)."""
    rel = rel.lstrip("/")
    for _ in range(40):
        p = root / rel
        if not p.is_symlink():
            return p
        target = os.readlink(p)
        if target.startswith("/"):
            rel = target.lstrip("/")
        else:
            rel = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    raise GuestImageError(f"symlink loop at {root / rel}")


# --- build ------------------------------------------------------------------


def init_script() -> bytes:
    # A plain path, not importlib.resources: editable installs of this project
    # expose vmd_py as a namespace package, which resources cannot read.
    return (Path(__file__).parent / INIT_NAME).read_bytes()


def input_key(packages: dict[str, str], init: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"builder {BUILDER_VERSION}\n".encode())
    for name in sorted(packages):
        h.update(f"{name} {packages[name]}\n".encode())
    h.update(hashlib.sha256(init).digest())
    return h.hexdigest()


class _Builder:
    def __init__(self, debs: Path, work: Path) -> None:
        self.debs = debs
        self.work = work
        self.used: dict[str, str] = {}  # package -> version actually used
        self.roots: dict[str, Path] = {}
        self.infos: dict[str, PkgInfo] = {}

    def info(self, name: str, batch: Iterable[str]) -> PkgInfo:
        """apt_show for name, asking about the library packages in batch at the same time."""
        if name not in self.infos:
            # One apt-cache run per batch: each run costs about a second.
            wanted = {name, *(n for n in batch if n.startswith("lib") and n not in self.infos)}
            self.infos.update(apt_show(sorted(wanted)))
        return self.infos[name]

    def fetch(self, pkg: PkgInfo) -> Path:
        if pkg.name not in self.roots:
            self.roots[pkg.name] = extract(download(pkg, self.debs), self.work / pkg.name)
        return self.roots[pkg.name]

    def libraries(self, programs: dict[PkgInfo, Path]) -> tuple[dict[str, bytes],
                                                               dict[str, str]]:
        """Files and symlinks of every shared object the programs need, transitively."""
        files: dict[str, bytes] = {}
        links: dict[str, str] = {}
        done: set[str] = set()
        unresolved: set[str] = set()

        def scan(data: bytes) -> None:
            needed, interp = elf_needed(data)
            unresolved.update(n for n in [*needed, *([interp] if interp else [])]
                              if n not in done)

        def find(name: str, root: Path) -> Path | None:
            rels = [name] if name.startswith("/") else [f"{d}/{name}" for d in LIB_DIRS]
            for rel in rels:
                p = resolve_in_root(root, rel)
                if p.is_file():
                    return p
            return None

        def take(name: str, src: Path) -> None:
            data = src.read_bytes()
            dst = f"{GUEST_LIBDIR}/{posixpath.basename(name)}"
            files[dst] = data
            if name.startswith("/") and name.lstrip("/") != dst:
                links[name.lstrip("/")] = f"/{dst}"
            done.add(name)
            unresolved.discard(name)
            scan(data)

        queue: collections.deque[str] = collections.deque()
        for pkg, binary in programs.items():
            scan(binary.read_bytes())
            queue.extend(pkg.depends)
        seen = {pkg.name for pkg in programs}
        while unresolved:
            # Library packages only (Debian policy names them lib*): follow the
            # dependency graph just until every soname is found.
            while queue and (queue[0] in seen or not queue[0].startswith("lib")):
                seen.add(queue.popleft())
            if not queue:
                raise GuestImageError(f"unresolved shared objects: {sorted(unresolved)}")
            name = queue.popleft()
            seen.add(name)
            info = self.info(name, queue)
            root = self.fetch(info)
            useful = False
            progress = True
            while progress:
                progress = False
                for soname in sorted(unresolved):
                    # An earlier package may provide what a later one needs.
                    for pkg_name, pkg_root in [(name, root), *self.roots.items()]:
                        src = find(soname, pkg_root)
                        if src is not None:
                            take(soname, src)
                            progress = True
                            useful = useful or pkg_name == name
                            break
            if useful:
                self.used[name] = info.version
                queue.extend(info.depends)
        return files, links

    def modules(self, kroot: Path, kver: str) -> tuple[dict[str, bytes], list[str], str]:
        """Module files, load order and a modules.dep for the wanted modules."""
        base = kroot / "lib/modules" / kver
        builtin = {
            posixpath.basename(line.strip())[: -len(".ko")].replace("-", "_")
            for line in (base / "modules.builtin").read_text().splitlines()
            if line.strip()
        }
        by_name = {p.name[: -len(".ko")].replace("-", "_"): p for p in base.rglob("*.ko")}
        order: list[str] = []
        deps: dict[str, list[str]] = {}

        def visit(name: str, stack: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name in order or name in builtin:
                return
            if name in stack:
                raise GuestImageError(f"module dependency loop: {stack}")
            if name not in by_name:
                raise GuestImageError(f"module {name} not in {kver}")
            info = modinfo(by_name[name].read_bytes())
            mine = [d for dep in info.get("depends", []) for d in dep.split(",") if d]
            deps[name] = mine
            for dep in mine:
                visit(dep, (*stack, name))
            order.append(name)

        for name in WANTED_MODULES:
            visit(name, ())
        rel = {n: by_name[n].relative_to(base).as_posix() for n in order}
        files = {f"lib/modules/{kver}/{rel[n]}": by_name[n].read_bytes() for n in order}

        def closure(n: str) -> list[str]:
            out: list[str] = []
            for d in deps[n]:
                d = d.replace("-", "_")
                if d in rel:
                    out += [x for x in [*closure(d), d] if x not in out]
            return out

        dep_lines = [f"{rel[n]}: {' '.join(rel[d] for d in reversed(closure(n)))}".rstrip()
                     for n in order]
        return files, [rel[n] for n in order], "\n".join(dep_lines) + "\n"


def _entries(files: dict[str, bytes], symlinks: dict[str, str], init: bytes) -> list[CpioEntry]:
    dirs: set[str] = {"dev", "bin"}
    for path in [*files, *symlinks]:
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    out = [CpioEntry(d, 0o040755) for d in sorted(dirs)]
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    out.append(CpioEntry("dev/console", 0o020600, rdev=(5, 1)))
    out.append(CpioEntry("init", 0o100755, init))
    for path in sorted(files):
        out.append(CpioEntry(path, 0o100755 if _is_exec(path) else 0o100644, files[path]))
    for path in sorted(symlinks):
        out.append(CpioEntry(path, 0o120777, symlinks[path].encode()))
    return out


def _is_exec(path: str) -> bool:
    return path.startswith(("bin/", "sbin/", "usr/bin/", "usr/sbin/")) or ".so" in path


def _manifest_ok(image_dir: Path, packages: dict[str, str], init: bytes) -> dict[str, object]:
    try:
        manifest: dict[str, object] = json.loads((image_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if manifest.get("key") != input_key(packages, init):
        return {}
    if not all((image_dir / n).is_file() for n in ("vmlinuz", "initrd.gz")):
        return {}
    return manifest


def _image(image_dir: Path, manifest: dict[str, object]) -> GuestImage:
    return GuestImage(image_dir / "vmlinuz", image_dir / "initrd.gz",
                      str(manifest["kernel_release"]), str(manifest["key"]),
                      image_dir / "manifest.json")


def ensure_guest_image(cache_dir: Path | None = None, force: bool = False) -> GuestImage:
    """Return the cached default guest, building it first when any input changed."""
    cache = cache_dir or Path(os.environ.get("VMD_GUEST_CACHE") or DEFAULT_CACHE)
    image_dir = cache / "image"
    debs = cache / "debs"
    init = init_script()

    if not force:
        try:
            old = json.loads((image_dir / "manifest.json").read_text())
            names = [str(n) for n in old["packages"]]
        except (OSError, ValueError, KeyError, TypeError):
            names = []
        if names:
            # One apt-cache run answers both "which kernel now" and "which versions now".
            current = apt_show([KERNEL_META, *names])
            kpkg = _kernel_dep(current[KERNEL_META])
            versions = {n: current[n].version for n in names}
            manifest = _manifest_ok(image_dir, versions, init) if kpkg in names else {}
            if manifest:
                log("up to date")
                return _image(image_dir, manifest)
    kpkg = kernel_package()

    log(f"building in {cache}")
    debs.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        b = _Builder(debs, Path(tmp))
        infos = apt_show([kpkg, *ROOT_PACKAGES])
        for info in infos.values():
            b.fetch(info)
            b.used[info.name] = info.version
        kver = kpkg[len("linux-image-") :]
        kroot = b.roots[kpkg]
        if not (kroot / "lib/modules" / kver).is_dir():
            raise GuestImageError(f"{kpkg} has no /lib/modules/{kver}")

        files: dict[str, bytes] = {}
        symlinks = {"bin/sh": "busybox"}
        files["bin/busybox"] = (b.roots["busybox-static"] / "bin/busybox").read_bytes()
        programs = {infos[name]: b.roots[name] / path for name, path in PROGRAMS.items()}
        for name, path in PROGRAMS.items():
            files[path] = (b.roots[name] / path).read_bytes()
        libs, lib_links = b.libraries(programs)
        files.update(libs)
        symlinks.update(lib_links)
        mod_files, order, moddep = b.modules(kroot, kver)
        files.update(mod_files)
        files[f"lib/modules/{kver}/vmd.load-order"] = ("\n".join(order) + "\n").encode()
        files[f"lib/modules/{kver}/modules.dep"] = moddep.encode()

        log("writing initrd")
        entries = _entries(files, symlinks, init)
        key = input_key(b.used, init)
        manifest = {
            "builder_version": BUILDER_VERSION,
            "key": key,
            "kernel_release": kver,
            "packages": dict(sorted(b.used.items())),
            "init_sha256": hashlib.sha256(init).hexdigest(),
            "modules": order,
            "files": [e.path for e in entries],
        }
        tmp_initrd = Path(tmp) / "initrd.gz"
        # mtime=0 keeps the archive byte-identical for identical inputs.
        tmp_initrd.write_bytes(gzip.compress(write_cpio(entries), compresslevel=6, mtime=0))
        tmp_kernel = Path(tmp) / "vmlinuz"
        shutil.copyfile(kroot / "boot" / f"vmlinuz-{kver}", tmp_kernel)
        os.replace(tmp_kernel, image_dir / "vmlinuz")
        os.replace(tmp_initrd, image_dir / "initrd.gz")
        tmp_manifest = Path(tmp) / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp_manifest, image_dir / "manifest.json")
    log(f"built {kver} ({key[:12]})")
    return _image(image_dir, manifest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmd_py.guest_image", description=__doc__)
    ap.add_argument("--cache", type=Path, default=None, help="cache directory")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    try:
        img = ensure_guest_image(args.cache, args.force)
    except GuestImageError as exc:
        log(f"error: {exc}")
        return 1
    print(img.kernel)
    print(img.initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
