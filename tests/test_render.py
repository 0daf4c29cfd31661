"""The boot-time autoload files: exact content for every style, the sysconfig script run for real
in a minimal root, the coreos unit through systemd-analyze, modprobe.d through kmod's own parser,
the shared-file merges through a real shell, and `toa render` end to end."""

import os
import posixpath
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, json_items, toa
from toa import __version__ as version
from toa import render, targets
from toa.errors import ToaError
from toa.qemu import find_busybox

HEADER_START = "# Written by toa: "
LINES_HEADER = "# Added by toa: load the toa module at boot. To stop, delete this line and the next."

# (target, kernel release) per style; each style is proven on at least three.
MODULES_LOAD_D = [("debian-12", "6.1.0-56-amd64"), ("ubuntu-22.04", "5.15.0-91-generic"),
                  ("rocky-8", "4.18.0-513.5.1.el8_9.x86_64"), ("rocky-9", "5.14.0-362.8.1.el9_3.x86_64")]
SYSCONFIG_MODULES = [("centos-6", "2.6.32-754.el6.x86_64"), ("centos-6", "2.6.32-696.30.1.el6.x86_64"),
                     ("centos-7", "3.10.0-1160.el7.x86_64"), ("rhel-7", "3.10.0-693.el7.x86_64")]
SYSCONFIG_KERNEL = [("sles-11", "3.0.101-63-default"), ("sles-11", "3.0.76-0.11-default"),
                    ("sles-11", "3.0.13-0.27-default")]
COREOS_UNIT = [("fedora-coreos", "6.5.6-300.fc39.x86_64"), ("flatcar", "6.6.21-flatcar"),
               ("coreos", "4.19.106-coreos")]
ETC_MODULES = [("debian-11", "5.10.0-40-amd64", "sysv"), ("ubuntu-20.04", "5.4.0-150-generic", "other"),
               ("debian-13", "6.12.112+deb13-amd64", "sysv")]


def hook_path(target_id):
    """Where the kernel-install hook goes for a target: the package manager's own place."""
    family = targets.get(target_id).family
    if family == "debian":
        return ["/etc/kernel/postinst.d/zz-toa", "/etc/kernel/header_postinst.d/zz-toa"]
    if target_id in ("centos-6", "centos-7", "rhel-7"):
        return ["/etc/kernel/postinst.d/zz-toa"]
    return ["/etc/kernel/install.d/90-toa.install"] if family == "rhel" else []


def by_path(files):
    return {entry.path: entry for entry in files}


def body(content):
    """The lines that are not comments."""
    return [line for line in content.splitlines() if line and not line.startswith("#")]


# ---------------------------------------------------------------- content per style


@pytest.mark.parametrize("target_id,release", MODULES_LOAD_D)
def test_modules_load_d(target_id, release):
    files = by_path(render.autoload_files(targets.get(target_id), release))
    assert sorted(files) == sorted(["/etc/modprobe.d/toa.conf", "/etc/modules-load.d/toa.conf", *hook_path(target_id)])
    conf = files["/etc/modules-load.d/toa.conf"]
    assert (conf.mode, conf.kind) == (0o644, "file")
    assert conf.content.startswith(HEADER_START)
    assert body(conf.content) == ["toa"]
    assert render.module_path(targets.get(target_id), release) == f"/lib/modules/{release}/extra/toa.ko"


@pytest.mark.parametrize("target_id,release", SYSCONFIG_MODULES)
def test_sysconfig_modules(target_id, release):
    files = by_path(render.autoload_files(targets.get(target_id), release, init="sysv"))
    assert sorted(files) == sorted(["/etc/modprobe.d/toa.conf", "/etc/sysconfig/modules/toa.modules",
                                    *hook_path(target_id)])
    script = files["/etc/sysconfig/modules/toa.modules"]
    assert (script.mode, script.kind) == (0o755, "file")
    assert script.content.startswith("#!/bin/sh\n" + HEADER_START)
    assert body(script.content) == [
        'PATH="${PATH:+$PATH:}/sbin:/usr/sbin:/bin:/usr/bin"',
        'if [ -e "/lib/modules/$(uname -r)/extra/toa.ko" ]; then',
        "    modprobe toa >/dev/null 2>&1 || :",
        "fi",
        "exit 0",
    ]


@pytest.mark.parametrize("target_id,release", SYSCONFIG_KERNEL)
def test_sysconfig_kernel(target_id, release):
    files = by_path(render.autoload_files(targets.get(target_id), release, init="sysv"))
    assert sorted(files) == ["/etc/modprobe.d/toa.conf", "/etc/modprobe.d/unsupported-modules", "/etc/sysconfig/kernel"]
    kernel = files["/etc/sysconfig/kernel"]
    assert kernel.kind == "lines"
    assert kernel.content.splitlines() == [LINES_HEADER, 'MODULES_LOADED_ON_BOOT="$MODULES_LOADED_ON_BOOT toa"']
    assert body(files["/etc/modprobe.d/unsupported-modules"].content) == ["allow_unsupported_modules 1"]


@pytest.mark.parametrize("target_id,release", COREOS_UNIT)
@pytest.mark.parametrize("init", ["systemd", "sysv"])  # these hosts always boot systemd
def test_coreos_unit(target_id, release, init):
    target = targets.get(target_id)
    files = by_path(render.autoload_files(target, release, init=init, options={"kinds": "254,200"}))
    build_files = {entry.path for entry in render.build_at_boot_files(target)}
    assert sorted(set(files) - build_files) == ["/etc/systemd/system/sysinit.target.wants/toa.service",
                                                "/etc/systemd/system/toa.service"]
    # Fedora CoreOS builds a missing module at boot; Flatcar's build image is not on a registry
    assert bool(build_files) == (target_id == "fedora-coreos") == render.builds_at_boot(target)
    until = "toa-build.service builds one (after the network is up) or " if build_files else ""
    unit = files["/etc/systemd/system/toa.service"]
    assert unit.content.startswith(HEADER_START)
    assert body(unit.content) == [
        "[Unit]",
        "Description=Load the toa kernel module (client addresses from TCP options)",
        "DefaultDependencies=no",
        "RequiresMountsFor=/var/lib/toa",
        "ConditionPathExists=!/sys/module/toa",
        "Before=network-pre.target sysinit.target",
        "Wants=network-pre.target",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStartPre=/bin/sh -c 'test -f /var/lib/toa/%v/toa.ko || { echo \"toa: no toa.ko for kernel %v in "
        f"/var/lib/toa/%v/: client addresses are the load balancer until {until}one is deployed (invoke deploy "
        "--build-missing)\" >&2; exit 1; }'",
        "ExecStart=/sbin/insmod /var/lib/toa/%v/toa.ko kinds=254,200",
        "[Install]",
        "WantedBy=sysinit.target",
    ]
    link = files["/etc/systemd/system/sysinit.target.wants/toa.service"]
    assert (link.kind, link.content) == ("symlink", "../toa.service")
    assert render.module_path(target, release) == f"/var/lib/toa/{release}/toa.ko"


@pytest.mark.parametrize("target_id,release,init", ETC_MODULES)
def test_etc_modules_without_systemd(target_id, release, init):
    files = by_path(render.autoload_files(targets.get(target_id), release, init=init))
    assert sorted(files) == sorted(["/etc/modprobe.d/toa.conf", "/etc/modules", *hook_path(target_id)])
    line = files["/etc/modules"]
    assert (line.kind, line.content.splitlines()) == ("lines", [LINES_HEADER, "toa"])


@pytest.mark.parametrize("target_id,release,expected", [
    ("centos-7", "3.10.0-1160.el7.x86_64", "/etc/sysconfig/modules/toa.modules"),
    ("sles-15", "5.14.21-150500.55.39-default", "/etc/sysconfig/kernel"),
    ("debian-12", "6.1.0-56-amd64", "/etc/modules"),
])
def test_without_systemd_each_family_uses_its_own_way(target_id, release, expected):
    assert expected in by_path(render.autoload_files(targets.get(target_id), release, init="sysv"))


@pytest.mark.parametrize("target_id,release,unsupported", [
    ("sles-12", "4.12.14-122.37-default", "/etc/modprobe.d/10-unsupported-modules.conf"),
    ("sles-15", "5.14.21-150500.55.39-default", "/etc/modprobe.d/10-unsupported-modules.conf"),
    ("sles-11", "3.0.101-63-default", "/etc/modprobe.d/unsupported-modules"),
])
def test_sles_allows_unsupported_modules(target_id, release, unsupported):
    files = by_path(render.autoload_files(targets.get(target_id), release))
    assert body(files[unsupported].content) == ["allow_unsupported_modules 1"]


def test_opensuse_needs_no_unsupported_setting():
    files = by_path(render.autoload_files(targets.get("opensuse-leap-15"), "5.14.21-150500.55.39-default"))
    assert not [path for path in files if "unsupported" in path]


def test_every_target_renders_and_every_file_says_toa_wrote_it():
    for target in targets.all_targets().values():
        for init in render.INITS:
            for entry in render.autoload_files(target, "1.2.3-test", init=init):
                assert entry.path.startswith("/etc/"), entry
                if entry.kind == "file":
                    first = entry.content.splitlines()[1 if entry.content.startswith("#!") else 0]
                    assert first.startswith(HEADER_START), (target.id, entry.path)
                    assert "delete" in entry.content or "set it back" in entry.content
                elif entry.kind == "lines":
                    assert entry.content.splitlines()[0] == LINES_HEADER


# ---------------------------------------------------------------- module options


def test_options_line():
    files = by_path(render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64", options={"kinds": "254,253"}))
    assert body(files["/etc/modprobe.d/toa.conf"].content) == ["options toa kinds=254,253"]


def test_trusted_ranges_are_written_as_the_module_shows_them():
    options = {"kinds": "254", "trusted": "100.64.0.0/10,fd00:1:0:0::/64,192.0.2.10"}
    files = by_path(render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64", options=options))
    assert body(files["/etc/modprobe.d/toa.conf"].content) == [
        "options toa kinds=254 trusted=100.64.0.0/10,fd00:1::/64,192.0.2.10/32"]
    unit = by_path(render.autoload_files(targets.get("flatcar"), "6.6.21-flatcar", options=options))
    assert "toa.ko kinds=254 trusted=100.64.0.0/10,fd00:1::/64,192.0.2.10/32\n" in unit[render.COREOS_UNIT].content
    # empty: the module's default, every source; nothing to write
    assert render.module_options({"trusted": ""}) == ""


def test_no_options_leaves_the_defaults():
    files = by_path(render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64"))
    assert body(files["/etc/modprobe.d/toa.conf"].content) == []
    assert "kinds=254,253" in files["/etc/modprobe.d/toa.conf"].content


@pytest.mark.parametrize("options,fragment", [
    ({"kind": "254"}, "unknown module option 'kind'"),
    ({"kinds; rm -rf /": "1"}, "invalid module option name"),
    ({"kinds": ""}, "invalid kinds"),
    ({"kinds": "254 253"}, "invalid kinds"),
    ({"kinds": "254,\n253"}, "invalid kinds"),
    ({"kinds": "254,"}, "invalid kinds"),
    ({"kinds": "1"}, "1 is not a TCP option kind"),
    ({"kinds": "256"}, "256 is not a TCP option kind"),
    ({"kinds": "254,254"}, "each option kind once"),
    ({"kinds": "2,3,4,5,6"}, "at most 4"),
    ({"kinds": "0x10"}, "invalid kinds"),
    ({"kinds": "0253"}, "decimal"),  # the kernel would read it as octal 171
    ({"kinds": "0"}, "decimal"),
    ({"trusted": "10.0.0.1/8"}, "did you mean 10.0.0.0/8"),
    ({"trusted": "10.0.0.0/33"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "balancer.example"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "10.0.0.0/8 fd00::/8"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "10.0.0.0/8,"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "fe80::1%eth0"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "010.0.0.0/8"}, "not an IPv4 or IPv6 address or CIDR"),
    ({"trusted": "::ffff:10.0.0.0/104"}, "IPv4-mapped"),
    ({"trusted": "10.0.0.0/8,10.0.0.0/8"}, "given twice"),
    ({"trusted": ",".join(f"10.0.{n}.0/24" for n in range(17))}, "at most 16"),
])
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ToaError, match=fragment.replace("(", r"\(")):
        render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64", options=options)


@pytest.mark.parametrize("release", ["6.1.0-56-amd64; reboot", "../../etc", "", "-rf"])
def test_bad_release_is_refused(release):
    with pytest.raises(ToaError, match="kernel release"):
        render.autoload_files(targets.get("debian-12"), release)
    with pytest.raises(ToaError, match="kernel release"):
        render.module_path(targets.get("debian-12"), release)


def test_bad_init_is_refused():
    with pytest.raises(ToaError, match="unknown init 'upstart'"):
        render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64", init="upstart")


def test_kmod_parses_the_options_file(tmp_path):
    """The host's own modprobe (kmod) reads the rendered modprobe.d file without complaint."""
    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    if not os.path.exists(modprobe):
        pytest.skip("modprobe (kmod) is not installed")
    files = render.autoload_files(targets.get("centos-6"), "2.6.32-754.el6.x86_64", init="sysv",
                                  options={"kinds": "254,200"})
    render.write_tree(files, tmp_path)
    result = subprocess.run([modprobe, "-C", str(tmp_path / "etc/modprobe.d"), "-c"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "options toa kinds=254,200" in result.stdout.splitlines()


# ---------------------------------------------------------------- the sysconfig script, run for real


@pytest.fixture
def script_text():
    files = by_path(render.autoload_files(targets.get("centos-6"), "2.6.32-754.el6.x86_64", init="sysv"))
    return files["/etc/sysconfig/modules/toa.modules"].content


@pytest.mark.parametrize("shell", ["sh", "dash", "bash", "busybox"])
def test_sysconfig_script_syntax(tmp_path, script_text, shell):
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    script = tmp_path / "toa.modules"
    script.write_text(script_text)
    argv = [path, "sh", "-n", str(script)] if shell == "busybox" else [path, "-n", str(script)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def _copy_program(root: Path, program: str, name: str) -> None:
    """PROGRAM into ROOT/bin/NAME, with the shared libraries ldd says it needs at their own paths."""
    shutil.copy2(program, root / "bin" / name)
    listing = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for word in listing.split():
        if word.startswith("/"):
            (root / word.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(word, root / word.lstrip("/"))


def _boot_root(root: Path, script_text: str, modprobe_exit: int | None) -> Path:
    """A root with /dev/null, dash as /bin/sh (busybox's sh would run its own modprobe applet
    instead of the one on PATH), busybox's uname (the real running kernel's release) and, unless
    MODPROBE_EXIT is None, a modprobe on /record that records its arguments and exits with it."""
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    try:  # the script sends modprobe's chatter to /dev/null, as a booting system has one
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("cannot create a /dev/null device node here (needs CAP_MKNOD)")
    (root / "dev/null").chmod(0o666)
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash is not installed")
    _copy_program(root, dash, "sh")
    shutil.copy2(find_busybox(), root / "bin/busybox")
    os.symlink("busybox", root / "bin/uname")
    if modprobe_exit is not None:
        (root / "record").mkdir()
        stub = root / "record/modprobe"
        stub.write_text(f'#!/bin/sh\necho "$*" >> /record/calls\nexit {modprobe_exit}\n')
        stub.chmod(0o755)
    script = root / "etc/sysconfig/modules/toa.modules"
    script.parent.mkdir(parents=True)
    script.write_text(script_text)
    script.chmod(0o755)
    return script


def _run_chrooted(root: Path):
    # How rc.sysinit runs it: executed directly (its #! line picks the shell), PATH as at boot.
    return subprocess.run(
        [shutil.which("chroot"), str(root), "/etc/sysconfig/modules/toa.modules"],
        env={"PATH": "/record:/bin"}, capture_output=True, text=True, timeout=30,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chroot"), reason="chroot needs root")


@needs_root
def test_sysconfig_script_loads_the_module_built_for_the_running_kernel(tmp_path, script_text):
    _boot_root(tmp_path, script_text, modprobe_exit=0)
    module = tmp_path / "lib/modules" / os.uname().release / "extra/toa.ko"
    module.parent.mkdir(parents=True)
    module.write_bytes(b"")
    result = _run_chrooted(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert (tmp_path / "record/calls").read_text() == "toa\n"


@needs_root
def test_sysconfig_script_skips_a_module_built_for_another_kernel(tmp_path, script_text):
    _boot_root(tmp_path, script_text, modprobe_exit=0)
    other = tmp_path / "lib/modules" / (os.uname().release + "-other") / "extra/toa.ko"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")
    result = _run_chrooted(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "record/calls").exists()


@needs_root
@pytest.mark.parametrize("modprobe_exit", [1, None], ids=["modprobe-fails", "no-modprobe"])
def test_sysconfig_script_never_fails_the_boot(tmp_path, script_text, modprobe_exit):
    _boot_root(tmp_path, script_text, modprobe_exit=modprobe_exit)
    module = tmp_path / "lib/modules" / os.uname().release / "extra/toa.ko"
    module.parent.mkdir(parents=True)
    module.write_bytes(b"")
    result = _run_chrooted(tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    if modprobe_exit is not None:
        assert (tmp_path / "record/calls").read_text() == "toa\n"


# ---------------------------------------------------------------- the coreos unit, verified by systemd


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt: systemd)")
@pytest.mark.parametrize("target_id,release", COREOS_UNIT)
def test_systemd_analyze_verifies_the_unit(tmp_path, target_id, release):
    files = render.autoload_files(targets.get(target_id), release, options={"kinds": "254"})
    render.write_tree(files, tmp_path)
    unit = tmp_path / "etc/systemd/system/toa.service"
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    link = tmp_path / "etc/systemd/system/sysinit.target.wants/toa.service"
    assert link.is_symlink() and link.resolve() == unit.resolve()
    if render.builds_at_boot(targets.get(target_id)):
        build_unit = tmp_path / "etc/systemd/system/toa-build.service"
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(build_unit)], capture_output=True, text=True)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr


# ---------------------------------------------------------------- shared files: merge and unmerge


def _sysconfig_kernel_entry():
    return by_path(render.autoload_files(targets.get("sles-11"), "3.0.101-63-default"))["/etc/sysconfig/kernel"]


def _etc_modules_entry():
    return by_path(render.autoload_files(targets.get("debian-11"), "5.10.0-40-amd64", init="sysv"))["/etc/modules"]


def _sourced(tmp_path, text):
    path = tmp_path / "kernel"
    path.write_text(text)
    result = subprocess.run(["sh", "-c", '. "$1"; printf %s "$MODULES_LOADED_ON_BOOT"', "sh", str(path)],
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("existing,expected", [
    ('## Type: string\nMODULES_LOADED_ON_BOOT="ipmi_si ipmi_devintf"\nINITRD_MODULES="ahci"\n', "ipmi_si ipmi_devintf toa"),
    ('MODULES_LOADED_ON_BOOT=""', " toa"),
    (None, " toa"),
])
def test_sysconfig_kernel_merge_extends_the_variable(tmp_path, existing, expected):
    entry = _sysconfig_kernel_entry()
    merged = entry.merge(existing)
    assert _sourced(tmp_path, merged) == expected
    assert entry.merge(merged) == merged  # idempotent
    if existing is not None:
        assert _sourced(tmp_path, entry.unmerge(merged)) == _sourced(tmp_path, existing)


def test_etc_modules_merge_and_unmerge():
    entry = _etc_modules_entry()
    existing = "# /etc/modules: kernel modules to load at boot time.\nloop\n"
    merged = entry.merge(existing)
    assert merged == existing + LINES_HEADER + "\ntoa\n"
    assert entry.merge(merged) == merged
    assert entry.unmerge(merged) == existing
    assert entry.unmerge(existing) == existing
    # A bare "toa" someone added by hand becomes toa's block, not a second load.
    assert body(entry.merge("loop\ntoa\n")) == ["loop", "toa"]
    assert entry.merge(None) == LINES_HEADER + "\ntoa\n"


def test_whole_files_replace_and_unmerge_to_deletion():
    conf = by_path(render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64"))["/etc/modules-load.d/toa.conf"]
    assert conf.merge("something else\n") == conf.content
    assert conf.unmerge(conf.content) is None


# ---------------------------------------------------------------- write_tree and `toa render`


def test_write_tree_keeps_shared_files_apart(tmp_path):
    written = render.write_tree(render.autoload_files(targets.get("debian-11"), "5.10.0-40-amd64", init="sysv"), tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == [
        "etc/kernel/header_postinst.d/zz-toa", "etc/kernel/postinst.d/zz-toa", "etc/modprobe.d/toa.conf",
        "etc/modules.toa-lines"]
    assert not (tmp_path / "etc/modules").exists()


@pytest.mark.parametrize("target_id", ["debian-12", "ubuntu-22.04", "centos-7", "rocky-9"])
def test_hosts_with_a_kernel_hook_get_the_module_sources_it_builds(target_id):
    """The hooks build from toa's own sources, which go beside them (versioned, apart from DKMS's
    /usr/src/toa-<version>): every source file, no build output."""
    target = targets.get(target_id)
    hooks = [entry for entry in render.autoload_files(target, "6.1.0-56-amd64") if "/etc/kernel/" in entry.path]
    sources = by_path(render.hook_sources(target))
    where = f"/usr/src/toa-kmod-{version}"
    assert hooks and all(f'src={where}\n' in hook.content for hook in hooks)
    assert sorted(sources) == sorted(f"{where}/{path.as_posix()}" for path in render.module_source_files())
    assert {f"{where}/toa.c", f"{where}/Kbuild", f"{where}/Makefile", f"{where}/probes/has_kvcalloc.c"} <= set(sources)
    assert sources[f"{where}/toa.c"].content == (render.MODULE_SOURCE / "toa.c").read_text()
    assert all(entry.mode == 0o644 and entry.kind == "file" for entry in sources.values())
    assert not any(path.endswith((".o", ".ko", "probes.h")) for path in sources)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt: shellcheck)")
@pytest.mark.parametrize("target_id", ["debian-12", "centos-7", "rocky-9"])
def test_kernel_hooks_pass_shellcheck_as_posix_sh(target_id, tmp_path):
    for hook in render.kernel_hooks(targets.get(target_id)):
        script = tmp_path / hook.path.replace("/", "_")
        script.write_text(hook.content)
        checked = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("target_id", ["sles-15", "flatcar"])
def test_hosts_without_a_kernel_hook_get_no_sources(target_id):
    assert render.kernel_hooks(targets.get(target_id)) == [] and render.hook_sources(targets.get(target_id)) == []


# ---------------------------------------------------------------- Fedora CoreOS: the build at boot


def test_fedora_coreos_builds_at_boot_from_sources_in_its_writable_tree():
    target = targets.get("fedora-coreos")
    files = by_path(render.build_at_boot_files(target))
    assert list(files) == [render.COREOS_BUILD_UNIT, render.COREOS_BUILD_WANTS_LINK, render.COREOS_BUILD_SCRIPT,
                           render.COREOS_CONTAINER_SCRIPT]
    assert files[render.COREOS_BUILD_WANTS_LINK].content == "../toa-build.service"
    assert files[render.COREOS_BUILD_SCRIPT].mode == 0o755
    unit = body(files[render.COREOS_BUILD_UNIT].content)
    for wanted in ("After=network-online.target", "ConditionPathExists=!/var/lib/toa/%v/toa.ko",
                   "EnvironmentFile=-/etc/toa/build.env", f"ExecStart=/bin/sh {render.COREOS_BUILD_SCRIPT} %v",
                   "ExecStartPost=/bin/systemctl restart toa.service", "WantedBy=multi-user.target"):
        assert wanted in unit, wanted
    # the host's own Fedora release unless the admin pins an image
    assert 'image="quay.io/fedora/fedora:${VERSION_ID}"' in files[render.COREOS_BUILD_SCRIPT].content
    sources = render.hook_sources(target)
    assert sources and all(entry.path.startswith(render.COREOS_SOURCE_DIR + "/") for entry in sources)
    assert render.hook_source_dir(target) == render.COREOS_SOURCE_DIR  # /usr is read-only there


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt: shellcheck)")
def test_the_build_at_boot_scripts_pass_shellcheck_as_posix_sh(tmp_path):
    for entry in render.build_at_boot_files(targets.get("fedora-coreos")):
        if entry.path.endswith(".sh"):
            script = tmp_path / posixpath.basename(entry.path)
            script.write_text(entry.content)
            checked = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stdout


def build_at_boot_script(tmp_path, **paths) -> Path:
    """build-at-boot.sh as rendered for a host, with its trees under TMP_PATH."""
    values = {"module_root": str(tmp_path / "var-lib-toa"), "source_dir": str(render.MODULE_SOURCE),
              "container_script": str(tmp_path / "build-in-container.sh"),
              "default_image": "quay.io/fedora/fedora:${VERSION_ID}", **paths}
    (tmp_path / "build-in-container.sh").write_text(
        render.render_template(render.TEMPLATES_DIR, "build-in-container.sh.j2"))
    script = tmp_path / "build-at-boot.sh"
    script.write_text(render.render_template(render.TEMPLATES_DIR, "build-at-boot.sh.j2", **values))
    return script


@pytest.mark.parametrize("release,error", [
    ("6.8.5-301.fc40.x86_64", "no container engine (podman or docker) to build it: install one, or deploy a build"),
    ("6.8.5;reboot", "'6.8.5;reboot' is not a kernel release"),
])
def test_the_build_at_boot_fails_in_one_line_and_never_silently(tmp_path, release, error):
    script = build_at_boot_script(tmp_path)
    bin_dir = tmp_path / "bin"  # the host's tools, without podman or docker
    bin_dir.mkdir()
    for tool in ("sh", "mkdir", "mktemp", "rm", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["sh", str(script), release], capture_output=True, text=True,
                            env={"PATH": str(bin_dir)})
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"toa: no toa.ko for kernel {release}: {error}")
    assert "client addresses are the load balancer's" in result.stderr


@pytest.mark.docker
@pytest.mark.network
def test_the_build_at_boot_builds_toa_for_a_debian_kernel_in_a_container(tmp_path, guest_kernels):
    """The build at boot's scripts, run for real with docker: a Debian image stands in for Fedora's
    (no Fedora repository is reachable here); the container installs the kernel's headers from the
    mirror and builds, and the host's script checks the module is for that kernel and installs it."""
    import io

    import docker

    from toa import build, debian

    if debian.mirror_for("security") is None:
        pytest.skip("no Debian security mirror in apt's sources here: bookworm's newest kernel is on it")
    client = docker.from_env()
    base = build.base_image(client, "bookworm")
    # with its security pocket, as Fedora's images come with their updates: bookworm's newest kernel is there
    sources = "".join(f"deb {debian.mirror_for(archive)} {suite} main\\n"
                      for archive, suite in (("debian", "bookworm"), ("security", "bookworm-security")))
    dockerfile = f"FROM {base.tags[0]}\nRUN printf '{sources}' > /etc/apt/sources.list\n"
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag="toa-test:build-at-boot-bookworm",
                                   rm=True)
    script = build_at_boot_script(tmp_path)
    release = guest_kernels[0].release  # the newest bookworm kernel
    env = {"PATH": os.environ["PATH"], "TOA_CONTAINER_ENGINE": "docker", "TOA_BUILD_IMAGE": image.tags[0]}
    result = subprocess.run(["sh", str(script), release], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    module = tmp_path / "var-lib-toa" / release / "toa.ko"
    vermagic = subprocess.run(["modinfo", "-F", "vermagic", str(module)], capture_output=True, text=True, check=True)
    assert vermagic.stdout.startswith(release + " ")
    assert f"toa: built toa.ko for kernel {release}" in result.stderr
    assert [path.name for path in (tmp_path / "var-lib-toa").iterdir()] == [release]  # no work directory left
    # present: nothing to do, no container started
    again = subprocess.run(["sh", str(script), release], capture_output=True, text=True, env=env, timeout=60)
    assert (again.returncode, again.stderr) == (0, "")


def test_write_tree_refuses_a_file_as_out(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(ToaError, match="not a directory"):
        render.write_tree(render.autoload_files(targets.get("debian-12"), "6.1.0-56-amd64"), out)
    assert out.read_text() == "keep me"


def _mode(path):
    return stat.S_IMODE(path.lstat().st_mode)


def test_toa_render_writes_the_files_with_their_modes(tmp_path):
    out = tmp_path / "out"
    result = toa("render", "--distro", "centos-6", "--kernel", "2.6.32-754.el6.x86_64", "--init", "sysv",
                 "--option", "kinds=254,200", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "/etc/sysconfig/modules/toa.modules" in result.stdout
    assert _mode(out / "etc/sysconfig/modules/toa.modules") == 0o755
    assert _mode(out / "etc/modprobe.d/toa.conf") == 0o644
    assert body((out / "etc/modprobe.d/toa.conf").read_text()) == ["options toa kinds=254,200"]


def test_toa_render_json_for_a_coreos_host(tmp_path):
    out = tmp_path / "out"
    result = toa("render", "--distro", "flatcar", "--kernel", "6.6.21-flatcar", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    [report] = json_items(result, "render")
    assert (report["target"], report["module"]) == ("flatcar", "/var/lib/toa/6.6.21-flatcar/toa.ko")
    assert [(f["path"], f["mode"], f["kind"]) for f in report["files"]] == [
        ("/etc/systemd/system/toa.service", "0644", "file"),
        ("/etc/systemd/system/sysinit.target.wants/toa.service", "0777", "symlink"),
    ]
    assert (out / "etc/systemd/system/toa.service").read_text() == report["files"][0]["content"]
    assert os.readlink(out / "etc/systemd/system/sysinit.target.wants/toa.service") == "../toa.service"


def test_toa_render_picks_the_target_from_the_kernel(tmp_path):
    result = toa("render", "--kernel", "3.0.101-63-default", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    [report] = json_items(result, "render")
    assert report["target"] == "sles-11"
    assert "/etc/sysconfig/kernel" in [f["path"] for f in report["files"]]


@pytest.mark.parametrize("args,fragment", [
    (["--distro", "debian-12", "--kernel", "6.1.0-56-amd64;reboot"], "invalid kernel release"),
    (["--distro", "beos-5", "--kernel", "6.1.0-56-amd64"], "unknown distro 'beos-5'"),
    (["--distro", "centos-7", "--kernel", "6.1.0-56-amd64"], "is not a centos-7 kernel"),
    (["--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--option", "kinds=254,999"], "999 is not a TCP option kind"),
    (["--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--option", "debug=1"], "unknown module option 'debug'"),
    (["--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--option", "kinds"], "invalid --option 'kinds'"),
    (["--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--init", "upstart"], "unknown init 'upstart'"),
    (["--distro", "debian-12"], "give --kernel"),
])
def test_toa_render_errors_are_one_line_and_write_nothing(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = toa("render", *args, "--out", str(out))
    assert_one_line_error(result, fragment)
    assert result.returncode == 2
    assert not out.exists()


def test_toa_render_refuses_an_out_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    result = toa("render", "--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--out", str(out))
    assert_one_line_error(result, "not a directory")
    assert result.returncode == 2
    assert out.read_text() == "keep me"


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_toa_render_writes_nothing_through_a_symlinked_component(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (out / "etc").mkdir(parents=True)
    (out / "etc/modprobe.d").symlink_to(victim)
    result = toa("render", "--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--out", str(out))
    assert_one_line_error(result, f"{out}/etc/modprobe.d is a symlink")
    assert result.returncode == 2
    assert _tree(victim) == [] and _tree(out) == ["etc", "etc/modprobe.d"]


def test_toa_render_writes_no_file_through_a_symlinked_destination(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.conf"
    victim.write_text("keep me")
    (out / "etc/modprobe.d").mkdir(parents=True)
    (out / "etc/modprobe.d/toa.conf").symlink_to(victim)
    result = toa("render", "--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--out", str(out))
    assert_one_line_error(result, "toa.conf is a symlink")
    assert victim.read_text() == "keep me"
    assert not (out / "etc/modules-load.d").exists()  # checked before the first file was written


def test_toa_render_checks_every_destination_before_writing(tmp_path):
    out = tmp_path / "out"
    (out / "etc").mkdir(parents=True)
    (out / "etc/modprobe.d").write_text("a file where a directory goes")
    result = toa("render", "--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--out", str(out))
    assert_one_line_error(result, "modprobe.d is not a directory")
    assert _tree(out) == ["etc", "etc/modprobe.d"]


def test_toa_render_unwritable_out_is_one_line(tmp_path):
    result = toa("render", "--distro", "debian-12", "--kernel", "6.1.0-56-amd64", "--out", "/proc/self/toa-out")
    target = targets.get("debian-12")
    written = len(render.autoload_files(target, "6.1.0-56-amd64")) + len(render.hook_sources(target))
    assert_one_line_error(result, "cannot write", f"0 of {written} files were written")


def test_toa_render_again_into_the_same_out_replaces_its_own_files(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        result = toa("render", "--distro", "flatcar", "--kernel", "6.6.21-flatcar", "--out", str(out),
                     "--option", "trusted=10.0.0.0/8")
        assert result.returncode == 0, result.stderr
    assert os.readlink(out / "etc/systemd/system/sysinit.target.wants/toa.service") == "../toa.service"
    assert "trusted=10.0.0.0/8" in (out / "etc/systemd/system/toa.service").read_text()


# ---------------------------------------------------------------- the CoreOS unit under a real systemd


@pytest.fixture(scope="module")
def systemd_guest(guest_kernels, tmp_path_factory):
    """One guest (bookworm's newest kernel) booting systemd."""
    from toa import guests

    with guests.fleet(guest_kernels[:1], tmp_path_factory.mktemp("guest")) as running:
        yield running[0]


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
@pytest.mark.ssh
def test_the_coreos_unit_fails_visibly_without_a_module_and_loads_toa_with_one(systemd_guest, tmp_path):
    import base64

    from toa import build

    guest, release = systemd_guest, systemd_guest.release
    target = targets.get("fedora-coreos")
    for entry in render.autoload_files(target, release, options={"kinds": "254,200"}) + render.hook_sources(target):
        guest.run(f"mkdir -p {posixpath.dirname(entry.path)}")
        if entry.kind == "symlink":
            guest.run(f"ln -sfn {entry.content} {entry.path}")
        else:
            encoded = base64.b64encode(entry.content.encode()).decode()
            guest.run(f"echo {encoded} | base64 -d > {entry.path} && chmod {entry.mode:o} {entry.path}")
    guest.run("systemctl daemon-reload")
    assert guest.run("systemctl is-enabled toa.service toa-build.service").split() == ["enabled", "enabled"]

    # A kernel without its build (an OS update came first): the unit fails and the journal says why.
    out = guest.run("systemctl start toa.service; echo rc=$?; systemctl is-failed toa.service; "
                    "journalctl -u toa.service --no-pager -o cat")
    assert "rc=1" in out and "\nfailed\n" in out, out
    assert f"toa: no toa.ko for kernel {release} in /var/lib/toa/{release}/" in out
    # The build at boot, on a host without a container engine (the guest has none): it fails too,
    # with its own line, and the boot goes on.
    out = guest.run("systemctl start toa-build.service; echo rc=$?; systemctl is-failed toa-build.service; "
                    "journalctl -u toa-build.service --no-pager -o cat")
    assert "rc=1" in out and "\nfailed\n" in out, out
    assert f"toa: no toa.ko for kernel {release}: no container engine (podman or docker) to build it" in out
    assert guest.run("test -d /sys/module/toa && echo loaded || echo absent").strip() == "absent"

    dist = tmp_path / "dist"
    build.build_kernel(release, out_dir=dist)
    guest.run(f"mkdir -p /var/lib/toa/{release}")
    with guest.connect() as conn:
        conn.put(str(next(dist.glob(f"*/{release}/toa.ko"))), f"/var/lib/toa/{release}/toa.ko")
    out = guest.run("systemctl reset-failed toa.service; systemctl start toa.service; systemctl is-active toa.service; "
                    "cat /sys/module/toa/parameters/kinds")
    assert out.split() == ["active", "254,200"], out
    # a kernel with its module: the build at boot has nothing to do
    out = guest.run("systemctl reset-failed toa-build.service; systemctl start toa-build.service; "
                    "systemctl show -P ConditionResult toa-build.service")
    assert out.strip() == "no", out


# ---------------------------------------------------------------- the eBPF engine's unit


def test_bpf_unit_attaches_before_the_network_and_detaches_on_stop():
    files = by_path(render.bpf_files({"kinds": "254,200", "trusted": "10.0.0.0/8"}))
    assert list(files) == [render.BPF_UNIT, render.BPF_WANTS_LINK]
    assert files[render.BPF_WANTS_LINK].kind == "symlink" and files[render.BPF_WANTS_LINK].content == "../toa-bpf.service"
    lines = body(files[render.BPF_UNIT].content)
    assert files[render.BPF_UNIT].content.startswith(HEADER_START)
    for wanted in ("DefaultDependencies=no", "Before=network-pre.target sysinit.target shutdown.target",
                   "Wants=network-pre.target", "After=systemd-modules-load.service", "Conflicts=shutdown.target",
                   "Type=oneshot", "RemainAfterExit=yes", "WantedBy=sysinit.target",
                   f"ExecStart={render.BPF_LOADER} attach kinds=254,200 trusted=10.0.0.0/8",
                   f"ExecStop={render.BPF_LOADER} detach"):
        assert wanted in lines, wanted
    # no options: the engine's defaults, nothing after attach
    assert f"ExecStart={render.BPF_LOADER} attach" in body(render.bpf_files()[0].content)


def test_bpf_unit_refuses_to_attach_beside_a_loaded_module(tmp_path):
    """The ExecStartPre check, run by a real shell against a fake /sys/module."""
    unit = render.bpf_unit("/x.service", "/usr/sbin/toa-bpf").content
    check = next(line for line in unit.splitlines() if line.startswith("ExecStartPre=/bin/sh -c "))
    script = check.removeprefix("ExecStartPre=/bin/sh -c ").strip("'").replace("/sys/module/toa", str(tmp_path / "toa"))
    assert subprocess.run(["sh", "-c", script]).returncode == 0
    (tmp_path / "toa").mkdir()
    refused = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert refused.returncode == 1 and "toa kernel module is loaded" in refused.stderr


def test_bpf_options_are_checked_like_the_modules():
    with pytest.raises(ToaError, match="kinds"):
        render.bpf_files({"kinds": "254;reboot"})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt: systemd)")
def test_systemd_analyze_verifies_the_bpf_unit(tmp_path):
    # the loader's path must exist for verify: the unit as a package would render it for a loader at `true`
    unit = render.bpf_unit(str(tmp_path / "toa-bpf.service"), shutil.which("true"), {"kinds": "254"})
    render.write_tree([unit], tmp_path / "root")
    path = tmp_path / "root" / unit.path.lstrip("/")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
