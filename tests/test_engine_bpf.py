"""The eBPF engine's build, read offline: the object (what a kernel will be asked to load), the static
loader that embeds it, its option rules and the lab guest that proves it. No kernel is touched here: the
loader runs only its `check` and `object` commands, which make no BPF call. tests/test_lab.py boots it."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from tests.cli import assert_one_line_error, toa as run_toa
from toa import artifacts, engine_bpf, lab, qemu
from toa.errors import ToaError

EM_BPF = 247


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> artifacts.BpfArtifact:
    return engine_bpf.build(tmp_path_factory.mktemp("bpf"))


def loader(built: artifacts.BpfArtifact, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(built.loader), *args], capture_output=True, text=True, timeout=30)


def test_the_build_writes_both_files_and_a_manifest_of_them(built):
    manifest = json.loads(built.manifest.read_text())
    assert manifest["object"]["sha256"] == engine_bpf.sha256(built.object) == built.object_sha256
    assert manifest["loader"]["sha256"] == engine_bpf.sha256(built.loader)
    assert manifest["loader"]["embeds_object_sha256"] == built.object_sha256
    assert manifest["toolchain"]["clang"].startswith(("Debian clang version", "clang version"))
    assert manifest["source_hash"] == engine_bpf.source_hash()
    assert artifacts.BpfArtifact.from_dir(built.object.parent).object_sha256 == built.object_sha256


def test_a_second_build_keeps_the_first_and_a_forced_one_makes_the_same_bytes(built):
    again = engine_bpf.build(built.object.parent)
    assert again.skipped and again.object_sha256 == built.object_sha256
    forced = engine_bpf.build(built.object.parent, force=True)
    assert not forced.skipped and forced.object_sha256 == built.object_sha256


def test_the_object_is_the_same_wherever_the_sources_are(built, tmp_path):
    """Reproducible: no build path or time in the bytes (one object, one sha256, for every kernel)."""
    elsewhere = tmp_path / "some" / "other" / "checkout"
    shutil.copytree(engine_bpf.SOURCE_DIR, elsewhere)
    other = engine_bpf.build(tmp_path / "out", source_dir=elsewhere)
    assert other.object_sha256 == built.object_sha256
    assert str(elsewhere).encode() not in other.object.read_bytes()
    assert str(engine_bpf.SOURCE_DIR).encode() not in built.object.read_bytes()


def btf_ext_core_relocations(data: bytes) -> int:
    """Bytes of CO-RE relocation records in a .BTF.ext section (0: the object needs no kernel BTF)."""
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data)
    assert magic == 0xEB9F
    if hdr_len < 32:  # a header without the CO-RE fields
        return 0
    _fi_off, _fi_len, _li_off, _li_len, _core_off, core_len = struct.unpack_from("<6I", data, 8)
    return core_len


def test_the_object_holds_the_three_programs_and_nothing_kernel_specific(built):
    with built.object.open("rb") as stream:
        elf = ELFFile(stream)
        assert elf["e_machine"] == "EM_BPF" or elf.header["e_machine"] == EM_BPF
        assert elf.little_endian
        sections = {section.name: section for section in elf.iter_sections()}
        assert {"sockops", "cgroup/getpeername4", "cgroup/getpeername6", ".maps", "license", ".BTF"} <= set(sections)
        assert sections["license"].data().rstrip(b"\0") == b"GPL"
        assert not [name for name in sections if name.startswith(".debug")]  # DWARF stripped, BTF kept
        # UAPI context fields only: no CO-RE relocation asks for the running kernel's BTF.
        assert btf_ext_core_relocations(sections[".BTF.ext"].data()) == 0
        programs = {symbol.name for symbol in elf.get_section_by_name(".symtab").iter_symbols()
                    if symbol["st_info"]["type"] == "STT_FUNC" and symbol["st_info"]["bind"] == "STB_GLOBAL"}
    assert programs == {"toa_sockops", "toa_peer4", "toa_peer6"}


def test_the_loader_is_static_and_carries_the_object(built):
    assert qemu.is_static_elf(built.loader)
    result = subprocess.run([str(built.loader), "object"], capture_output=True, timeout=30)
    assert result.returncode == 0 and result.stdout == built.object.read_bytes()


@pytest.mark.parametrize("given, shown", [
    ("kinds=254,253,200", "kinds 254,253,200"),
    ("trusted=10.0.0.2,FD00:0::2", "trusted 10.0.0.2/32,fd00::2/128"),
    ("trusted=0.0.0.0/00,::/0", "trusted 0.0.0.0/0,::/0"),
    ("trusted=100.64.0.0/10,fd00:1::/64,2001:db8:0:0:1:0:0:1", "trusted 100.64.0.0/10,fd00:1::/64,2001:db8::1:0:0:1/128"),
    ("trusted=", "trusted "),
])
def test_options_read_back_as_the_module_shows_them(built, given, shown):
    result = loader(built, "check", given)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown + "\n"


@pytest.mark.parametrize("given, message", [
    ("trusted=10.0.0.0/33", 'trusted: bad entry "10.0.0.0/33": the prefix length is not 0..32'),
    ("trusted=010.0.0.0/8", 'trusted: bad entry "010.0.0.0/8": an IPv4 octet with a leading zero'),
    ("trusted=fd00::1/16", 'trusted: bad entry "fd00::1/16": address bits are set past the prefix length'),
    ("trusted=::ffff:10.0.0.0/104", "a v4-mapped IPv6 address (write the IPv4 form)"),
    ("trusted=10.0.0.0/16,", 'trusted: bad entry "": an empty entry'),
    ("trusted=" + ",".join(f"10.0.0.{n}" for n in range(1, 18)), "trusted: more than 16 entries"),
    ("kinds=254,1", "kinds: 1 is not a TCP option kind that carries data (2..255)"),
    ("kinds=2,3,4,5,6", "kinds: at most 4 option kinds"),
    ("kinds=", "kinds: at least one option kind is needed"),
    ("table_bits=8", 'unknown option "table_bits=8"'),
])
def test_bad_options_are_refused_with_the_entry_named(built, given, message):
    result = loader(built, "check", given)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toa-bpf: error: ") and message in lines[0], lines


def test_sixteen_entries_are_the_limit_not_over_it(built):
    entries = [f"10.0.0.{n}" for n in range(1, 16)] + ["fd00::/16"]
    result = loader(built, "check", "trusted=" + ",".join(entries))
    assert result.returncode == 0
    assert result.stdout.startswith("trusted 10.0.0.1/32,10.0.0.2/32,") and result.stdout.endswith(",fd00::/16\n")


def test_a_changed_file_in_dist_is_not_taken_for_the_build(built, tmp_path):
    copy = tmp_path / "bpf"
    shutil.copytree(built.object.parent, copy)
    (copy / engine_bpf.OBJECT_NAME).write_bytes(b"not the object")
    with pytest.raises(ToaError, match="differs from"):
        artifacts.BpfArtifact.from_dir(copy)


def test_missing_tools_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToaError) as caught:
        engine_bpf.build(tmp_path / "out")
    assert "\n" not in str(caught.value) and "libbpf-dev" in str(caught.value)


# ---------------------------------------------------------------- the lab guest for the engine


def test_the_guest_runs_the_modules_checks_through_the_loader():
    init = lab.render_init_bpf(tun_modules=["tun.ko"], seed=42, fuzz=1000, cycles=100, object_sha256="ab" * 32)
    for step in ("export TOA_ENGINE_CTL=$CTL", "toa_peer basic\n", "toa_peer basic trusted", "toa_peer basic untrusted",
                 'toa_peer fuzz 42 1000 254,253 "${refused_from:-0}"', 'toa_peer fuzz 43 250 254,253,200',
                 "toa_peer tfo", 'toa_peer trust-flip "$PEER_TRUSTED" "$OTHER_TRUSTED"', "toa_peer trust-bad",
                 'toa_peer trust-race 300 "$PEER_TRUSTED" "$OTHER_TRUSTED"', "toa_peer many 300",
                 "toa_peer hold /tmp/hold-ready /tmp/hold-go &", 'toa_peer cycles 100 $CTL "trusted=$PEER_TRUSTED"',
                 "attach attach-trusted trusted=$PEER_TRUSTED", "attach attach-untrusted trusted=$OTHER_TRUSTED",
                 "attach attach-kinds200 kinds=254,253,200", "$CTL set kinds=254,253", f'= "{"ab" * 32}"'):
        assert step in init, step
    assert "/lib/toa.ko" not in init and "lockdown" not in init  # no module, unless signatures are enforced
    assert init.rstrip().endswith("poweroff -f")
    locked = lab.render_init_bpf(tun_modules=[], seed=1, fuzz=0, cycles=0, object_sha256="0" * 64, sig_enforce=True)
    assert "insmod /lib/toa.ko" in locked and "[integrity]" in locked
    assert "toa_peer fuzz" not in locked and "toa_peer cycles" not in locked


def test_every_required_case_of_the_engine_is_printed_somewhere():
    """A name the host waits for but nothing prints would fail every run; one printed twice would hide a step."""
    names = lab.required_cases_bpf(fuzz=10, cycles=2, sig_enforce=True)
    assert len(names) == len(set(names))
    template = (lab.GUEST_DIR / lab.BPF_INIT_TEMPLATE).read_text() + (lab.GUEST_DIR / "lab_begin.sh.j2").read_text()
    peer = lab.PEER_SOURCE.read_text()
    printed_by_init = set(re.findall(r"^\s*(?:check|attach|detach|refused|nothing_left) ([a-z0-9-]+)", template, re.M))
    peer_labels = ("basic", "trusted-basic", "untrusted-basic", "kinds-reset-", "fuzz-kinds", "trusted-", "tfo-",
                   "table-many-open", "hold-", "cycles", "before-attach-", "after-detach-", "after-all-")
    for name in names:
        assert name in printed_by_init or f'"{name}"' in peer or name.startswith(peer_labels), name
    for name in printed_by_init:
        assert name in names or name in ("hold-exit",), name
    assert '"hold-open"' in peer and '"hold-after-unload"' in peer and '"table-many-open"' in peer


def test_the_engine_is_given_to_verify_with_its_build(tmp_path):
    fake = tmp_path / "vmlinuz"
    fake.write_bytes(b"x")
    with pytest.raises(ToaError, match="bpf engine needs its build"):
        lab.verify(fake, None, "6.1.0-1-amd64", None, log_dir=tmp_path, timeout=10, engine="bpf")
    with pytest.raises(ToaError, match="unknown engine"):
        lab.verify(fake, None, "6.1.0-1-amd64", None, log_dir=tmp_path, timeout=10, engine="ebpf")


@pytest.mark.parametrize("args, fragment", [
    (["--suite", "bookworm", "--engine", "xdp"], "--engine must be one of module, bpf, not 'xdp'"),
    (["--suite", "bookworm", "--engine", "bpf", "--ko", "toa.ko"], "--engine bpf loads no toa.ko"),
    (["--vmlinuz", "/boot/vmlinuz", "--engine", "module"], "with --vmlinuz give --ko PATH"),
])
def test_verify_checks_its_engine_flags_before_anything_runs(args, fragment):
    result = run_toa("verify", *args, timeout=120)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
