"""toa.preflight: a built toa.ko checked against what the target kernel's loader accepts.

The real module is built (on this machine, --local, and in the suite's container) against the newest
bookworm kernel's real headers, and against copies of that tree changed the way other kernels differ:
a loader that predates R_X86_64_PLT32, a Module.symvers whose CRC moved, a SUSE kernel that refuses
unsupported modules, a kernel that forces signatures. Each is refused with its reason and nothing is
written to dist; the good module passes and the manifest records the checks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.cli import json_items, toa
from toa import build, preflight
from toa.errors import ToaError

# A loader's relocation switch as kernels before 4.16 have it (and one after): the evidence the check
# reads from a full source tree's arch/x86/kernel/module.c.
OLD_LOADER = """\
/* x86_64 module loader, relocation cases only (as before 4.16) */
switch (ELF64_R_TYPE(rel[i].r_info)) {
case R_X86_64_NONE: break;
case R_X86_64_64: *(u64 *)loc = val; break;
case R_X86_64_32: *(u32 *)loc = val; break;
case R_X86_64_32S: *(s32 *)loc = val; break;
case R_X86_64_PC32: val -= (u64)loc; *(u32 *)loc = val; break;
default: pr_err("%s: Unknown rela relocation: %llu\\n", me->name, ELF64_R_TYPE(rel[i].r_info)); return -ENOEXEC;
}
"""
NEW_LOADER = OLD_LOADER.replace("case R_X86_64_PC32:", "case R_X86_64_PC32:\ncase R_X86_64_PLT32:")


# ---------------------------------------------------------------- pure: the rules on made-up facts


def _module(**changes) -> preflight.Module:
    fields = dict(vermagic="4.4.74-92.35-default SMP mod_unload modversions ", modinfo={},
                  relocation_types=frozenset({1, 2, 4}), crcs={"printk": 0x27E1A049}, signed=False)
    return preflight.Module(**{**fields, **changes})


@pytest.mark.parametrize("release, takes", [
    ("4.4.74-92.35-default", False),       # SLES 12 SP2: refused by its loader (measured)
    ("3.10.0-693.el7.x86_64", False),      # CentOS 7.4: no known backport
    ("3.10.0-1127.el7.x86_64", True),      # RHEL 7.8: loads such modules (measured)
    ("3.10.0-1160.119.1.el7.x86_64", True),
    ("4.15.0-213-generic", False),
    ("4.16.0-1-amd64", True),
    ("6.1.0-9-amd64", True),
])
def test_plt32_by_release_and_known_backports(release, takes):
    assert preflight.loader_takes_plt32(preflight.Tree(release))[0] is takes


def test_loader_source_is_the_strongest_evidence():
    assert preflight.loader_takes_plt32(preflight.Tree("4.4.74-92.35-default", loader_source=NEW_LOADER))[0]
    assert not preflight.loader_takes_plt32(preflight.Tree("6.1.0-9-amd64", loader_source=OLD_LOADER))[0]


def test_plt32_refusal_names_the_linker_and_the_fix():
    tree = preflight.Tree("4.4.74-92.35-default")
    check = preflight.check_relocations(_module(), tree, "GNU ld (GNU Binutils for Debian) 2.40")
    assert not check.ok
    assert "linked by GNU ld (GNU Binutils for Debian) 2.40" in check.detail
    assert "'Unknown rela relocation: 4'" in check.detail and "distro's own container" in check.detail
    assert preflight.check_relocations(_module(relocation_types=frozenset({1, 2})), tree).ok
    assert not preflight.check_relocations(_module(relocation_types=frozenset({1, 42})), tree).ok


def test_symvers_and_config_parse():
    symvers = "0x27e1a049\tprintk\tvmlinux\tEXPORT_SYMBOL\t\n0x00000000\tns_sym\tfoo\tEXPORT_SYMBOL_GPL\tNS\njunk\n"
    assert preflight.parse_symvers(symvers) == {"printk": 0x27E1A049, "ns_sym": 0}
    config = "CONFIG_MODVERSIONS=y\n# CONFIG_MODULE_SIG_FORCE is not set\nCONFIG_MODULE_SIG_HASH=\"sha256\"\n"
    assert preflight.parse_config(config) == {"CONFIG_MODVERSIONS": "y", "CONFIG_MODULE_SIG_HASH": '"sha256"'}


def test_the_other_checks_on_made_up_trees():
    tree = preflight.Tree("4.4.74-92.35-default", config={"CONFIG_MODVERSIONS": "y"}, symvers={"printk": 0x1})
    assert "disagrees about version of symbol printk" in preflight.check_symbol_versions(_module(), tree).detail
    assert preflight.check_symbol_versions(_module(), preflight.Tree("4.4.74-92.35-default")).ok  # no symvers
    suse = preflight.Tree("4.4.74-92.35-default", config={"CONFIG_SUSE_KERNEL_SUPPORTED": "y"})
    assert not preflight.check_supported(_module(), suse).ok
    assert preflight.check_supported(_module(modinfo={"supported": "external"}), suse).ok
    forced = preflight.Tree("4.4.74-92.35-default", config={"CONFIG_MODULE_SIG_FORCE": "y"})
    assert not preflight.check_signature(_module(), forced).ok
    assert preflight.check_signature(_module(signed=True), forced).ok


# Printed by host_tree_command on a Debian 12 host with its kernel's headers installed (trimmed; the release
# written as 6.1.0-56-amd64, one the mirror no longer offers, so that no test source names a downloadable one).
RECORDED_HOST_TREE = """\
@@config /lib/modules/6.1.0-56-amd64/build/.config
@@set CONFIG_MODVERSIONS=y
@@set CONFIG_MODULE_SIG=y
@@symvers /lib/modules/6.1.0-56-amd64/build/Module.symvers
@@crc 0x92997ed8 _printk
@@crc 0xbdfb6dbb __fentry__
"""


def test_a_hosts_tree_from_recorded_output():
    tree = preflight.parse_host_tree(RECORDED_HOST_TREE, "6.1.0-56-amd64", "node1")
    assert tree.config == {"CONFIG_MODVERSIONS": "y", "CONFIG_MODULE_SIG": "y"}
    assert tree.symvers == {"_printk": 0x92997ED8, "__fentry__": 0xBDFB6DBB}
    assert tree.symvers_file == "node1:/lib/modules/6.1.0-56-amd64/build/Module.symvers"
    module = _module(vermagic="6.1.0-56-amd64 SMP", crcs={"_printk": 0x92997ED8, "kfree": 0x1})
    assert "exports no kfree" in preflight.check_symbol_versions(module, tree).detail
    bare = preflight.parse_host_tree("", "6.1.0-56-amd64", "node1")  # no headers, no /boot files
    assert bare.symvers is None and bare.config == {} and bare.loader_source is None
    unread = preflight.parse_host_tree("@@symvers /boot/symvers-6.1.0-56-amd64.gz\n", "6.1.0-56-amd64", "node1")
    assert unread.symvers is None  # a file that matched no symbol was not read (no zcat or awk): not checked


def test_the_host_command_takes_only_a_valid_release_and_symbol_names():
    with pytest.raises(ToaError, match="invalid kernel release"):
        preflight.host_tree_command("6.1.0-56-amd64; reboot", [])
    command = preflight.host_tree_command("6.1.0-56-amd64", ["_printk", "x; rm -rf /", "$(id)"])
    assert "_printk" in command and "rm -rf" not in command and "$(id)" not in command


# ---------------------------------------------------------------- real modules on real trees


@pytest.fixture(scope="module")
def kernel():
    """The newest bookworm kernel, fetched (its headers build with this machine's own gcc-12)."""
    from toa import debian

    return debian.prepare(None, "bookworm")[1]


@pytest.fixture(scope="module")
def good(kernel, tmp_path_factory):
    """toa.ko built on this machine against the kernel's real headers."""
    return build.build_local(kernel.release, kernel.headers_dir, tmp_path_factory.mktemp("dist"))


def changed_tree(kernel, where: Path, files: dict[str, str | None] = None, edit=None) -> Path:
    """A copy of the kernel's headers tree (beside a link to its kbuild tools) with FILES written over
    (None: removed) and EDIT(path) applied; the cached tree is never touched."""
    headers = kernel.headers_dir
    usr = where / "usr"
    shutil.copytree(headers, usr / "src" / headers.name, symlinks=True)
    (usr / "lib").symlink_to(headers.parent.parent / "lib")
    tree = usr / "src" / headers.name
    for name, text in (files or {}).items():
        (tree / name).unlink(missing_ok=True)
        if text is not None:
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_text(text)
    if edit:
        edit(tree)
    return tree


def _append(tree: Path, name: str, line: str) -> None:
    path = tree / name
    path.write_text(path.read_text() + line)


def _nothing_written(dist: Path, release: str) -> bool:
    return not list(dist.rglob("toa.ko")) and not list(dist.rglob("manifest.json"))


@pytest.mark.network
def test_a_good_module_passes_and_the_manifest_records_every_check(good, kernel):
    manifest = json.loads(good.manifest.read_text())
    assert [c["name"] for c in manifest["preflight"]] == ["vermagic", "relocations", "symbol versions",
                                                           "supported", "signature"]
    assert all(c["ok"] for c in manifest["preflight"]), manifest["preflight"]
    assert re.search(r"[0-9]+ symbol CRCs match", manifest["preflight"][2]["detail"])
    assert manifest["linker"].startswith("GNU ld")
    result = toa("preflight", "--ko", str(good.ko), "--headers", str(kernel.headers_dir), "--json")
    assert result.returncode == 0, result.stderr
    assert json_items(result, "preflight")[0]["ok"] is True


@pytest.mark.network
def test_a_loader_older_than_plt32_refuses_the_build(kernel, tmp_path):
    old = changed_tree(kernel, tmp_path / "old", {"arch/x86/kernel/module.c": OLD_LOADER})
    with pytest.raises(ToaError) as refused:
        build.build_local(kernel.release, old, tmp_path / "dist")
    message = str(refused.value)
    assert message.startswith(f"preflight relocations check refused the toa.ko for {kernel.release}: "
                              "the module carries R_X86_64_PLT32 relocations (linked by GNU ld")
    assert "has no case for R_X86_64_PLT32" in message and message.endswith("nothing was written to dist")
    assert "\n" not in message
    assert _nothing_written(tmp_path / "dist", kernel.release)
    new = changed_tree(kernel, tmp_path / "new", {"arch/x86/kernel/module.c": NEW_LOADER})
    passed = build.build_local(kernel.release, new, tmp_path / "dist")
    checks = json.loads(passed.manifest.read_text())["preflight"]
    assert "its loader source" in checks[1]["detail"] and "handles R_X86_64_PLT32" in checks[1]["detail"]


@pytest.mark.network
def test_a_crc_that_moved_is_refused_with_the_symbol(good, kernel, tmp_path):
    crcs = preflight.read_module(good.ko.read_bytes()).crcs
    symbol = sorted(crcs)[0]

    def move_crc(tree):
        text = (tree / "Module.symvers").read_text()
        moved = re.sub(rf"^0x[0-9a-f]+(\t{re.escape(symbol)}\t)", r"0x12345678\1", text, count=1, flags=re.M)
        assert moved != text
        (tree / "Module.symvers").unlink()
        (tree / "Module.symvers").write_text(moved)

    tree = changed_tree(kernel, tmp_path, edit=move_crc)
    result = toa("preflight", "--ko", str(good.ko), "--headers", str(tree))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"preflight symbol versions check refused the toa.ko for {kernel.release}: the module disagrees about "
        f"version of symbol {symbol}: built against CRC 0x{crcs[symbol]:08x}, {tree}/Module.symvers has "
        "0x12345678; rebuild against that tree")


@pytest.mark.network
def test_a_suse_kernel_that_refuses_unsupported_modules(good, kernel, tmp_path):
    def declare_suse(tree):
        for name, line in ((".config", "CONFIG_SUSE_KERNEL_SUPPORTED=y\n"),
                           ("include/config/auto.conf", "CONFIG_SUSE_KERNEL_SUPPORTED=y\n"),
                           ("include/generated/autoconf.h", "#define CONFIG_SUSE_KERNEL_SUPPORTED 1\n")):
            text = (tree / name).read_text()
            (tree / name).unlink()
            (tree / name).write_text(text + line)

    suse = changed_tree(kernel, tmp_path / "suse", edit=declare_suse)
    refused = toa("preflight", "--ko", str(good.ko), "--headers", str(suse))
    assert refused.returncode == 1
    assert "preflight supported check refused" in refused.stderr and "CONFIG_SUSE_KERNEL_SUPPORTED" in refused.stderr
    built = build.build_local(kernel.release, suse, tmp_path / "dist")  # toa's own build tags it
    assert preflight.read_module(built.ko.read_bytes()).modinfo["supported"] == "external"
    assert json.loads(built.manifest.read_text())["preflight"][3] == {
        "name": "supported", "ok": True, "detail": "supported=external"}


@pytest.mark.network
def test_a_kernel_that_forces_signatures_refuses_an_unsigned_build(kernel, tmp_path):
    def force_signatures(tree):
        text = (tree / ".config").read_text().replace("# CONFIG_MODULE_SIG_FORCE is not set", "CONFIG_MODULE_SIG_FORCE=y")
        (tree / ".config").unlink()
        (tree / ".config").write_text(text)

    forced = changed_tree(kernel, tmp_path, edit=force_signatures)
    with pytest.raises(ToaError, match=r"preflight signature check refused .*invoke sign --key KEY --cert CERT"):
        build.build_local(kernel.release, forced, tmp_path / "dist")
    assert _nothing_written(tmp_path / "dist", kernel.release)


@pytest.mark.docker
@pytest.mark.network
def test_a_container_build_records_the_preflight(kernel, tmp_path):
    result = build.build_module(kernel.headers_dir, kernel.release, "bookworm", tmp_path)
    manifest = json.loads(result.manifest.read_text())
    assert all(check["ok"] for check in manifest["preflight"]) and len(manifest["preflight"]) == 5
    assert "GNU ld" in manifest["linker"]


def test_preflight_task_errors_are_one_line(tmp_path):
    from tests.cli import assert_one_line_error

    assert_one_line_error(toa("preflight", "--ko", str(tmp_path / "none.ko")), "not found: pass --ko FILE")
    not_a_module = tmp_path / "x.ko"
    not_a_module.write_bytes(b"\x7fELF not really")
    assert_one_line_error(toa("preflight", "--ko", str(not_a_module), "--kernel", "6.1.0-9-amd64",
                              "--headers", str(tmp_path)), f"{not_a_module} has no .modinfo section")
    assert_one_line_error(toa("preflight", "--ko", str(not_a_module), "--kernel", "6.1.0-9-amd64;reboot"),
                          "invalid kernel release")
