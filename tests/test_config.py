"""vm.conf parser: model contents, diagnostics corpus, includes, macros, robustness."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmd_py.config import Config, ConfigError, Diagnostic, Owner, load, parse_text
from vmd_py.config.model import DEFAULT_MEMORY, DEFAULT_POLL_US

CONF = Path(__file__).parent / "conf"
GOOD = CONF / "good"
BAD = CONF / "bad"
MIB = 1024 * 1024


def errors_of(text: str, filename: str = "<string>") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_text(text, filename)
    return [str(d) for d in info.value.diagnostics]


# -- every keyword into the model ------------------------------------------------------


@pytest.fixture(scope="module")
def full() -> Config:
    return load(GOOD / "full.conf")


def test_globals(full: Config) -> None:
    assert full.macros == {"ramdisk": "/bsd.rd", "mem": "2G", "nics": "2"}
    assert full.local_prefix == IPv4Network("10.64.0.0/16")
    assert full.local_inet6 is True
    assert full.local_prefix6 == IPv6Network("fd00:beef::/64")
    assert full.socket_owner == Owner("_vmd", "vmusers")
    assert (full.staggered_start, full.staggered_parallel, full.staggered_delay) == (True, 3, 15)


def test_switches(full: Config) -> None:
    up = full.switches["uplink"]
    assert (up.ifname, up.group, up.locked_lladdr, up.up, up.enabled) == (
        "br0",
        "uplinkvms",
        True,
        False,
        False,
    )
    assert up.line == 11 and up.file == str(GOOD / "full.conf")
    lan = full.switches["lan"]
    assert (lan.ifname, lan.group, lan.locked_lladdr, lan.up, lan.enabled) == (
        "br1",
        None,
        False,
        True,
        True,
    )


def test_vm_every_option(full: Config) -> None:
    web = full.vms["web"]
    assert web.enabled and web.memory_bytes == 1024 * MIB
    assert (web.kernel, web.initrd) == ("/boot/vmlinuz", "/boot/initrd.img")
    assert web.cmdline == "console=ttyS0 quiet"  # backslash-newline inside quotes
    assert web.boot_device == "disk" and web.cdrom == "/iso/install.iso"
    assert [(d.path, d.format, d.line) for d in web.disks] == [
        ("/vm/web.qcow2", "qcow2", 34),
        ("/vm/data.img", "raw", 35),
        ("/vm/swap.img", None, 36),
    ]
    assert (web.owner_user, web.owner_group) == ("joe", "users")
    assert web.allow_instance == {
        "boot",
        "cdrom",
        "disk",
        "instance",
        "interface",
        "memory",
        "owner",
    }
    assert (web.instance_owner_user, web.instance_owner_group) == (None, "staff")
    assert web.instance_of is None and web.line == 25


def test_vm_interfaces(full: Config) -> None:
    n0, n1, n2, n3 = full.vms["web"].interfaces
    assert (
        n0.tap_name,
        n0.switch,
        n0.group,
        n0.locked_lladdr,
        n0.lladdr,
        n0.up,
        n0.local,
        n0.offload,
    ) == ("tap5", "uplink", "webvms", True, "fe:e1:ba:d0:00:01", True, False, "csum")
    assert (n1.tap_name, n1.local, n1.up, n1.offload, n1.switch) == (
        None,
        True,
        False,
        "none",
        None,
    )
    # inline options, comma separated, MAC normalised to two lowercase digits per octet
    assert (n2.switch, n2.lladdr, n2.offload) == ("lan", "fe:e1:ba:d0:00:02", "all")
    assert n3.locked_lladdr and n3.lladdr is None


@pytest.mark.parametrize(("text", "want"), [
    ("", DEFAULT_POLL_US), ("poll off", 0), ("poll 0", 0), ("poll 250us", 250),
    ("poll 20ms", 20_000), ("poll 1s", 1_000_000),
])
def test_interface_poll_window(text: str, want: int) -> None:
    conf = parse_text(f'vm "a" {{\n\tinterface {{ {text} }}\n}}\n')
    assert conf.vms["a"].interfaces[0].poll_us == want


def test_locked_inherited_from_switch(full: Config) -> None:
    nic = full.vms["web"].interfaces[0]
    assert full.nic_switch(nic) is full.switches["uplink"]
    cfg = parse_text(
        'switch "s" { interface br0\nlocked lladdr }\n'
        'vm "a" { interface { switch "s" }\n interface }'
    )
    on_switch, plain = cfg.vms["a"].interfaces
    assert on_switch.locked_lladdr is False and cfg.nic_locked(on_switch) is True
    assert cfg.nic_locked(plain) is False


def test_macros_and_interfaces_count(full: Config) -> None:
    b = full.vms["builder"]
    assert b.enabled is False and b.memory_bytes == 2048 * MIB and b.kernel == "/bsd.rd"
    assert b.boot_device == "net" and len(b.interfaces) == 2
    assert all(n.tap_name is None and n.switch is None for n in b.interfaces)
    assert (b.owner_user, b.owner_group) == (None, "wheel") and b.allow_instance == {"memory"}


def test_instance_inherits(full: Config) -> None:
    child = full.vms["builder2"]
    assert child.instance_of == "builder"
    assert child.memory_bytes == 4096 * MIB  # own setting wins
    assert child.kernel == "/bsd.rd" and child.boot_device == "cdrom"
    assert len(child.interfaces) == 2 and child.owner_group == "wheel"
    # relative paths are taken from the directory of the file that names them
    assert child.disks[0].path == str(GOOD / "relative" / "disk.img")


def test_instance_does_not_inherit_disks_names_or_macs() -> None:
    cfg = parse_text(
        'vm "p" { disk "/p.img"\n interface tap3 lladdr fe:e1:ba:d0:00:09 }\n'
        'vm "p" instance "c" { memory 1G }'
    )
    child = cfg.vms["c"]
    assert child.disks == [] and child.interfaces[0].tap_name is None
    assert child.interfaces[0].lladdr is None


def test_defaults() -> None:
    cfg = parse_text('vm "a" {\n}\n')
    vm = cfg.vms["a"]
    assert vm.enabled and vm.memory_bytes == DEFAULT_MEMORY == 512 * MIB
    assert vm.interfaces == [] and vm.disks == [] and vm.boot_device is None
    assert cfg.local_prefix == IPv4Network("100.64.0.0/10") and cfg.local_prefix6 is None
    assert cfg.socket_owner == Owner("root", "root") and cfg.staggered_start is False
    nic = parse_text('vm "a" { interface }').vms["a"].interfaces[0]
    assert (nic.up, nic.local, nic.offload, nic.locked_lladdr) == (True, False, "all", False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MIB),
        ("1G", 1024 * MIB),
        ("1.5g", 1536 * MIB),
        ("2097152", 2 * MIB),
        ("1536K", MIB),
        ('"64M"', 64 * MIB),
    ],
)
def test_memory_sizes(text: str, expected: int) -> None:
    assert parse_text(f'vm "a" {{ memory {text} }}').vms["a"].memory_bytes == expected


def test_socket_owner_forms() -> None:
    assert parse_text("socket owner joe").socket_owner == Owner("joe", "root")
    assert parse_text("socket owner :wheel").socket_owner == Owner("root", "wheel")
    assert parse_text("socket owner 1000:1000").socket_owner == Owner("1000", "1000")


def test_local_inet6_without_prefix_and_semicolons_and_continuation() -> None:
    cfg = parse_text('local inet6\nswitch \\\n  "s" { interface br0; group vms; up }\n')
    assert cfg.local_inet6 and cfg.local_prefix6 is None
    assert cfg.switches["s"].group == "vms"


def test_openbsd_man_page_examples() -> None:
    cfg = load(GOOD / "openbsd-example.conf")
    assert cfg.vms["vm3.example.com"].instance_of == "vm2.example.com"
    assert cfg.vms["vm3.example.com"].interfaces[0].switch == "uplink"
    assert cfg.switches["uplink"].ifname == "bridge0"


# -- macros and includes -----------------------------------------------------------------


def test_macro_is_one_token_and_not_expanded_in_quotes() -> None:
    cfg = parse_text('p = "/my disk.img"\nvm "a" { disk $p\n cmdline "$p" }')
    assert cfg.vms["a"].disks[0].path == "/my disk.img"
    assert cfg.vms["a"].cmdline == "$p"


def test_undefined_macro_reports_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "vm.conf"
    conf.write_text('vm "a" {\n\tboot $nope\n}\n')
    with pytest.raises(ConfigError) as info:
        load(conf)
    assert info.value.diagnostics == [Diagnostic(str(conf), 2, "macro 'nope' not defined")]


def test_include_relative_to_including_file() -> None:
    cfg = load(GOOD / "main.conf")
    assert cfg.switches["shared"].file == str(GOOD / "inc" / "switches.conf")
    assert cfg.switches["shared"].line == 3
    assert cfg.vms["a"].memory_bytes == 768 * MIB  # macro defined in the included file


def test_include_from_a_subdirectory_and_cwd_independence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.conf").write_text('include "c.conf"\n')
    (tmp_path / "sub" / "c.conf").write_text('\n\nvm "x" {\n memory 1\n}\n')
    (tmp_path / "a.conf").write_text('include "sub/b.conf"\n')
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "a.conf")
    assert [str(d) for d in info.value.diagnostics] == [
        f"{tmp_path}/sub/c.conf:4: memory too small: 1 (minimum 1M)"
    ]


# -- diagnostics corpus ------------------------------------------------------------------

SYNTAX_EOL = "syntax error: unexpected end of line"
EXPECTED: dict[str, list[str]] = {
    "syntax-unknown-keyword.conf": ['syntax-unknown-keyword.conf:2: syntax error: unexpected "x"'],
    "unterminated-string.conf": ["unterminated-string.conf:2: unterminated quoted string"],
    "undefined-macro.conf": ["undefined-macro.conf:3: macro 'kernl' not defined"],
    "missing-brace.conf": ["missing-brace.conf:1: missing '}' to close this block"],
    "unknown-switch.conf": ['unknown-switch.conf:5: vm "a": unknown switch "uplnk"'],
    "duplicate-vm.conf": [
        'duplicate-vm.conf:4: vm "a" defined more than once (first at {dir}/duplicate-vm.conf:1)'
    ],
    "duplicate-switch.conf": [
        'duplicate-switch.conf:5: switch "s" defined more than once'
        " (first at {dir}/duplicate-switch.conf:1)"
    ],
    "too-many-disks.conf": ["too-many-disks.conf:6: too many disks: 5 (maximum 4)"],
    "too-many-interfaces.conf": ["too-many-interfaces.conf:6: too many interfaces: 5 (maximum 4)"],
    "bad-mac.conf": [
        "bad-mac.conf:2: invalid lladdr: fe:e1:ba:d0:00",
        "bad-mac.conf:3: invalid lladdr: 01:00:5e:00:00:01 (multicast address)",
        "bad-mac.conf:4: invalid lladdr: zz:e1:ba:d0:00:01",
    ],
    "bad-size.conf": ["bad-size.conf:2: invalid size: 512Q"],
    "memory-limits.conf": [
        "memory-limits.conf:2: memory too small: 512K (minimum 1M)",
        "memory-limits.conf:5: memory too large: 1T (maximum 128G)",
    ],
    "interfaces-conflict.conf": [
        "interfaces-conflict.conf:2: interfaces 1 conflicts with 2 interface statements",
        "interfaces-conflict.conf:7: invalid number of interfaces: 5 (maximum 4)",
    ],
    "bad-prefix.conf": [
        "bad-prefix.conf:1: invalid local prefix: 100.64.0.1/10",
        "bad-prefix.conf:2: invalid local prefix: 100.64.0.0",
        "bad-prefix.conf:3: invalid local inet6 prefix: fd00::/96",
        "bad-prefix.conf:4: invalid local prefix: fd00::/8",
    ],
    "include-loop.conf": ["inc/loop-b.conf:2: include loop: {dir}/include-loop.conf"],
    "include-missing.conf": [
        "include-missing.conf:2: failed to include file {dir}/inc/does-not-exist.conf:"
        " No such file or directory"
    ],
    "include-error.conf": ["inc/broken.conf:5: invalid size: lots"],
    "multiple-errors.conf": [
        f"multiple-errors.conf:3: {SYNTAX_EOL}",
        "multiple-errors.conf:4: unrecognized disk format: vmdk",
        "multiple-errors.conf:5: syntax error: unexpected 'bogus'",
        "multiple-errors.conf:6: invalid lladdr: 00:00:00:00:00:00 (all zeros)",
        f"multiple-errors.conf:8: {SYNTAX_EOL}",
        "multiple-errors.conf:11: invalid group name: vm1",
        "multiple-errors.conf:15: invalid number of interfaces: 9 (maximum 4)",
    ],
    "bad-vm-name.conf": [
        "bad-vm-name.conf:1: invalid vm name: 1st",
        "bad-vm-name.conf:4: invalid vm name: has space",
    ],
    "instance-unknown-parent.conf": [
        'instance-unknown-parent.conf:1: vm "child": instance of unknown vm "nope"'
    ],
    "bad-offload.conf": ["bad-offload.conf:3: invalid offload: tso (expected all, csum or none)"],
    "bad-poll.conf": [
        "bad-poll.conf:3: invalid poll: 5 (expected off, or a time such as 500us, 1ms, 1s)",
        "bad-poll.conf:5: invalid poll: 2s (at most 1s)",
        "bad-poll.conf:6: invalid poll: fast (expected off, or a time such as 500us, 1ms, 1s)",
    ],
    "switch-missing-interface.conf": [
        'switch-missing-interface.conf:1: switch "lonely" is missing interface name'
    ],
    "bad-owner.conf": [
        "bad-owner.conf:1: invalid owner: bad user",
        "bad-owner.conf:3: invalid owner: joe:",
    ],
    "invalid-character.conf": ["invalid-character.conf:2: invalid character '!'"],
    "rdomain.conf": ["rdomain.conf:3: rdomain is not supported on Linux"],
    "specified-twice.conf": [
        "specified-twice.conf:3: memory specified more than once",
        "specified-twice.conf:5: boot specified more than once",
        "specified-twice.conf:7: interfaces specified more than once",
    ],
    "stray-brace.conf": ["stray-brace.conf:4: syntax error: unexpected '}'"],
    "duplicate-tap.conf": [
        "duplicate-tap.conf:5: interface tap7 already used by vm a",
        "duplicate-tap.conf:8: lladdr fe:e1:ba:d0:00:01 already used by vm b",
    ],
    "local-on-switch.conf": [
        "local-on-switch.conf:5: a local interface cannot be attached to a switch"
    ],
}


def test_corpus_is_complete() -> None:
    assert sorted(p.name for p in BAD.glob("*.conf")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


@pytest.mark.hostile
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_file(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(BAD / name)
    got = [str(d) for d in info.value.diagnostics]
    want = [f"{BAD}/" + line.replace("{dir}", str(BAD)) for line in EXPECTED[name]]
    assert got == want
    assert str(info.value) == "\n".join(want)


def test_good_corpus_loads() -> None:
    for path in GOOD.glob("*.conf"):
        assert isinstance(load(path), Config)


def test_missing_top_level_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.conf")
    (diag,) = info.value.diagnostics
    assert diag.file == str(tmp_path / "nope.conf") and "No such file" in diag.reason


def test_all_syntax_errors_in_one_block_and_across_statements() -> None:
    text = 'vm "a" {\n memory\n disk\n owner\n}\nbogus\nswitch "s" {\n interface\n}\n'
    assert errors_of(text, "x.conf") == [
        f"x.conf:2: {SYNTAX_EOL}",
        f"x.conf:3: {SYNTAX_EOL}",
        f"x.conf:4: {SYNTAX_EOL}",
        f"x.conf:6: {SYNTAX_EOL}",
        f"x.conf:8: {SYNTAX_EOL}",
    ]


def test_unclosed_block_at_end_of_file() -> None:
    assert errors_of('vm "a" {\n interface {\n switch "s"\n') == [
        "<string>:2: missing '}' to close this block"
    ]


def test_invalid_utf8(tmp_path: Path) -> None:
    conf = tmp_path / "vm.conf"
    conf.write_bytes(b'vm "a" {\n boot "\xff"\n}\n')
    with pytest.raises(ConfigError) as info:
        load(conf)
    assert info.value.diagnostics == [Diagnostic(str(conf), 2, "invalid UTF-8")]


def test_no_partial_config_on_error() -> None:
    with pytest.raises(ConfigError):
        parse_text('vm "good" { memory 1G }\nvm "bad" { memory 1K }\n')


# -- robustness --------------------------------------------------------------------------

_ALPHABET = st.sampled_from(
    [
        "vm",
        "switch",
        "interface",
        "local",
        "memory",
        "disk",
        "{",
        "}",
        "\n",
        " ",
        '"',
        "$",
        "x",
        "1G",
        "=",
        ",",
        ";",
        "\\",
        "#",
        "instance",
        "lladdr",
        "locked",
        "include",
        "owner",
        "allow",
        "boot",
        "device",
        "tap0",
        "fe:e1:ba:d0:00:01",
        "'",
        "\x00",
        "é",
        "prefix",
        "inet6",
        "1",
        "-1",
        "99999999999999999999",
    ]
)


@pytest.mark.hostile
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_ALPHABET, max_size=60).map("".join), st.text(max_size=200)))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        cfg = parse_text(text)
    except ConfigError as exc:
        assert exc.diagnostics, "a ConfigError must carry at least one diagnostic"
        assert all(d.line >= 0 and d.reason for d in exc.diagnostics)
    else:
        assert isinstance(cfg, Config)


def test_user_doc_examples_parse() -> None:
    import re

    doc = (Path(__file__).parent.parent / "docs" / "vm.conf.md").read_text()
    switches = 'switch "uplink" { interface br0 }\nswitch "lan" { interface br1 }\n'
    blocks = [b for b in re.findall(r"```\n(.*?)```", doc, re.S) if not b.startswith("include")]
    assert len(blocks) >= 4
    for block in blocks:
        parse_text(block if 'switch "uplink" {' in block else switches + block)


def test_poll_bounds_match_vionets() -> None:
    # The parent's config and the sandboxed worker each keep the numbers (the worker does not
    # import the config parser); they must agree.
    from vionet import datapath
    from vmd_py.config import model

    assert (model.DEFAULT_POLL_US, model.MAX_POLL_US) == (
        datapath.DEFAULT_POLL_US, datapath.MAX_POLL_US)
