"""Detection: real distros' release files (fixtures), the kernel corpus, and this machine."""

import json
import os
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, json_items, toa
from toa import detect, kernel
from toa.errors import ToaError

FIXTURES = Path(__file__).parent / "fixtures"
ROOTS = json.loads((FIXTURES / "roots" / "expected.json").read_text())
KERNELS = json.loads((FIXTURES / "kernels.json").read_text())
HOSTILE = json.loads((FIXTURES / "hostile_releases.json").read_text())


@pytest.mark.parametrize("name", sorted(ROOTS))
def test_root_fixture_is_detected(name):
    platform = detect.identify(detect.read_root(FIXTURES / "roots" / name))
    got = {"family": platform.family, "distro": platform.distro, "version": platform.version,
           "init": platform.init, "target": platform.target.id if platform.target else None}
    assert got == ROOTS[name]


def test_every_target_has_a_fixture():
    from toa.targets import all_targets

    assert {v["target"] for v in ROOTS.values()} == set(all_targets())


@pytest.mark.parametrize("name", ["centos-7", "sles-11", "debian-sid", "fedora-coreos"])
def test_detect_root_on_the_command_line(name):
    result = toa("detect", "--root", str(FIXTURES / "roots" / name), "--json")
    assert result.returncode == 0, result.stderr
    [info] = json_items(result, "detect")
    assert {k: info[k] for k in ("family", "distro", "version", "target")} == {
        k: ROOTS[name][k] for k in ("family", "distro", "version", "target")
    }
    assert {"kernel", "init", "headers_package", "headers_path"} <= set(info)


def test_root_kernel_and_headers_come_from_its_modules(tmp_path):
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "redhat-release").write_text("CentOS Linux release 7.9.2009 (Core)\n")
    for release in ("3.10.0-1160.el7.x86_64", "3.10.0-1160.119.1.el7.x86_64"):
        (root / "lib" / "modules" / release).mkdir(parents=True)
    platform = detect.identify(detect.read_root(root))
    assert platform.kernel == "3.10.0-1160.119.1.el7.x86_64"
    assert platform.headers == ("kernel-devel-3.10.0-1160.119.1.el7.x86_64",
                                "/usr/src/kernels/3.10.0-1160.119.1.el7.x86_64")


def test_root_symlinks_resolve_inside_the_root_component_by_component(tmp_path):
    # A usrmerged image with absolute links, a link chain through a directory, and links that try to
    # leave the root: what is read must be the image's, never this machine's.
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "os-release").write_text("ID=evil\nVERSION_ID=1\n")
    (outside / "lib" / "modules" / "9.9.9-evil").mkdir(parents=True)
    root = tmp_path / "img"
    (root / "usr" / "lib" / "modules" / "6.1.0-56-amd64").mkdir(parents=True)
    (root / "usr" / "lib" / "os-release").write_text("ID=debian\nVERSION_ID=12\n")
    (root / "usr" / "etc").mkdir()
    (root / "lib").symlink_to("/usr/lib")  # absolute: the image's /usr/lib, not this machine's
    (root / "etc").symlink_to("usr/etc")  # a directory link in the middle of the path
    (root / "usr" / "etc" / "os-release").symlink_to("../../../../../lib/os-release")  # `..` stops at the root
    facts = detect.read_root(root)
    assert facts.files["/etc/os-release"] == "ID=debian\nVERSION_ID=12\n"
    assert facts.kernel == "6.1.0-56-amd64"
    assert detect._inside(root, "/etc/../../../outside/etc/os-release") == root / "outside" / "etc" / "os-release"
    (root / "usr" / "etc" / "loop").symlink_to("loop")
    with pytest.raises(ToaError, match="too many symlinks"):
        detect._inside(root, "/etc/loop")


def test_a_root_whose_etc_points_at_this_machines_etc_is_not_read_as_this_machine(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    (root / "etc").symlink_to("/etc")  # re-rooted: img/etc again, a loop
    assert_one_line_error(toa("detect", "--root", str(root)), "too many symlinks")
    (root / "etc").unlink()
    (root / "etc").symlink_to("../../../../../../../etc")  # `..` stops at the root: img/etc again
    assert_one_line_error(toa("detect", "--root", str(root)), "too many symlinks")


def test_not_a_root_is_one_line(tmp_path):
    assert_one_line_error(toa("detect", "--root", str(tmp_path)), "no /etc/os-release")
    assert_one_line_error(toa("detect", "--root", str(tmp_path / "missing")), "not a directory")


def test_os_release_quoting_is_undone_not_executed():
    values = detect.parse_os_release('NAME="Foo $(id)"\nID=foo\nVERSION_ID=\'1.2\'\nbad line\nX=`uname`\n')
    assert values == {"NAME": "Foo $(id)", "ID": "foo", "VERSION_ID": "1.2", "X": "`uname`"}


@pytest.mark.parametrize("systemd, pid1, init", [(True, "systemd", "systemd"), (False, "init", "sysv"),
                                                 (False, None, "sysv"), (False, "tini", "other")])
def test_init_system(systemd, pid1, init):
    facts = detect.Facts(files={"/etc/os-release": "ID=debian\nVERSION_ID=12\n"}, systemd=systemd, pid1=pid1)
    assert detect.identify(facts).init == init


@pytest.mark.parametrize("systemd, pid1, autoload, written", [
    (True, "systemd", "modules-load.d", "/etc/modules-load.d/toa.conf"),
    (False, "init", "etc-modules", "/etc/modules"),
    (False, "tini", "etc-modules", "/etc/modules"),  # a container's own PID 1: no systemd to read modules-load.d
])
def test_detect_names_the_autoload_style_render_writes(systemd, pid1, autoload, written):
    from toa import render

    facts = detect.Facts(files={"/etc/os-release": "ID=debian\nVERSION_ID=12\n"}, systemd=systemd, pid1=pid1,
                         kernel="6.1.0-9-amd64")
    platform = detect.identify(facts)
    assert platform.as_dict()["autoload"] == autoload
    paths = [f.path for f in render.autoload_files(platform.target, platform.kernel, init=platform.init)]
    assert written in paths


# Minimal os-release lines of RHEL rebuilds toa has no target of its own for (ID, ID_LIKE, VERSION_ID
# as those distros set them), with the kernels they run.
REBUILDS = [
    ('ID="ol"\nID_LIKE="fedora"\nVERSION_ID="8.9"\nNAME="Oracle Linux Server"\n', "4.18.0-513.5.1.el8_9.x86_64", "rhel-8"),
    ('ID="ol"\nID_LIKE="fedora"\nVERSION_ID="8.9"\nNAME="Oracle Linux Server"\n', "5.15.0-200.131.27.el8uek.x86_64", None),
    ('ID="amzn"\nID_LIKE="centos rhel fedora"\nVERSION_ID="2"\nNAME="Amazon Linux"\n', "4.14.326-245.539.amzn2.x86_64", None),
    ('ID="anolis"\nID_LIKE="rhel fedora centos"\nVERSION_ID="8.6"\nNAME="Anolis OS"\n', "4.18.0-372.32.1.an8_6.x86_64", None),
    ('ID="openEuler"\nVERSION_ID="22.03"\nNAME="openEuler"\n', "5.10.0-60.18.0.50.oe2203.x86_64", None),
]


@pytest.mark.parametrize("os_release, kernel_release, target", REBUILDS)
def test_distros_without_a_target_are_built_as_rhel_or_named_unsupported(os_release, kernel_release, target):
    platform = detect.identify(detect.Facts(files={"/etc/os-release": os_release}, kernel=kernel_release,
                                            systemd=True))
    info = platform.as_dict()
    assert info["target"] == target
    if target:
        assert info["support"] == f"as {target}: {platform.name} has no target of its own, and {kernel_release} is a RHEL kernel"
        assert info["autoload"] == "modules-load.d"
    else:
        assert info["support"].startswith(f"unsupported: toa has no target for {platform.name}")
        assert f"kernel {kernel_release} is no kernel of a supported distro" in info["support"]
        assert "--local --headers DIR" in info["support"] and "\n" not in info["support"]


def test_remote_facts_parse():
    output = ("@@toa-file /etc/os-release\nID=ubuntu\nVERSION_ID=\"22.04\"\n\n"
              "@@toa-kernel 5.15.0-91-generic\n@@toa-pid1 systemd\n@@toa-systemd\n")
    platform = detect.identify(detect.parse_remote_facts(output))
    assert (platform.distro, platform.target.id, platform.kernel, platform.init) == (
        "ubuntu", "ubuntu-22.04", "5.15.0-91-generic", "systemd")
    with pytest.raises(ToaError):
        detect.parse_remote_facts("@@toa-kernel 5.15;reboot\n")


@pytest.mark.parametrize("entry", KERNELS, ids=[e["release"] for e in KERNELS])
def test_kernel_corpus_classifies(entry):
    found = kernel.classify(entry["release"])
    assert found is not None
    assert (found.family, found.distro, [t.id for t in found.targets]) == (
        entry["family"], entry["distro"], entry["targets"])
    assert kernel.resolve(entry["release"], entry["targets"][-1]).target.id == entry["targets"][-1]


@pytest.mark.parametrize("entry", HOSTILE, ids=[e["why"] for e in HOSTILE])
def test_hostile_releases_are_rejected(entry):
    with pytest.raises(ToaError, match="kernel release"):
        kernel.validate_release(entry["release"])


def test_this_machine():
    result = toa("detect", "--json")
    assert result.returncode == 0, result.stderr
    [info] = json_items(result, "detect")
    os_release = detect.parse_os_release(Path("/etc/os-release").read_text())
    assert (info["distro"], info["version"]) == (os_release["ID"], os_release["VERSION_ID"])
    assert info["kernel"] == os.uname().release
    human = toa("detect")
    assert os_release["PRETTY_NAME"] in human.stdout and os.uname().release in human.stdout


REMOTE_OUTPUT = """@@toa-file /etc/os-release
ID=rocky
VERSION_ID="9.4"
PRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"

@@toa-kernel 5.14.0-427.13.1.el9_4.x86_64
@@toa-pid1 systemd
@@toa-systemd
@@toa-installed 5.14.0-427.13.1.el9_4.x86_64
@@toa-installed 5.14.0-427.22.1.el9_4.x86_64
@@toa-installed 5.14.0-362.8.1.el9_3.x86_64
@@toa-installed $(reboot)
@@toa-default /boot/vmlinuz-5.14.0-427.13.1.el9_4.x86_64
"""


def test_installed_kernels_and_the_boot_loaders_default():
    platform = detect.identify(detect.parse_remote_facts(REMOTE_OUTPUT))
    # garbage a host prints is no kernel; the rest sorted oldest first
    assert platform.installed_kernels == ("5.14.0-362.8.1.el9_3.x86_64", "5.14.0-427.13.1.el9_4.x86_64",
                                          "5.14.0-427.22.1.el9_4.x86_64")
    # grubby's default wins over "the newest": someone pinned the running kernel
    assert (platform.next_kernel, platform.next_kernel_from) == ("5.14.0-427.13.1.el9_4.x86_64",
                                                                 "boot loader default (grubby)")
    without_grubby = detect.identify(detect.parse_remote_facts(REMOTE_OUTPUT.replace("@@toa-default", "@@x")))
    assert without_grubby.next_kernel == "5.14.0-427.22.1.el9_4.x86_64"
    assert without_grubby.as_dict()["next_kernel_from"] == "newest installed (GRUB's default entry)"


def test_a_coreos_host_does_not_claim_to_know_its_next_kernel():
    output = ("@@toa-file /etc/os-release\nID=flatcar\nVERSION_ID=3815.2.0\n\n@@toa-kernel 6.1.77-flatcar\n"
              "@@toa-installed 6.1.77-flatcar\n")
    platform = detect.identify(detect.parse_remote_facts(output))
    assert platform.installed_kernels == ("6.1.77-flatcar",) and platform.next_kernel is None


def test_a_root_lists_kernels_with_modules_not_headers_alone(tmp_path):
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("ID=debian\nVERSION_ID=12\n")
    for release, marker in (("6.1.0-40-amd64", "modules.dep"), ("6.1.0-56-amd64", "modules.order"),
                            ("6.12.90+deb12-amd64", None)):
        (root / "lib" / "modules" / release).mkdir(parents=True)
        if marker:
            (root / "lib" / "modules" / release / marker).write_text("")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.1.0-56-amd64").write_text("")
    platform = detect.identify(detect.read_root(root))
    assert platform.installed_kernels == ("6.1.0-40-amd64", "6.1.0-56-amd64")
    assert platform.next_kernel == "6.1.0-56-amd64"


def test_the_remote_facts_skip_usr_lib_os_release_where_etc_os_release_speaks():
    """REMOTE_FACTS_COMMAND run by sh on this machine: /usr/lib/os-release is not read where
    /etc/os-release has something (identify would not look at it), and the platform is the same."""
    import os
    import subprocess

    from toa import detect

    if not os.path.getsize("/etc/os-release"):
        pytest.skip("needs a machine with /etc/os-release")
    output = subprocess.run(["sh", "-c", detect.REMOTE_FACTS_COMMAND], capture_output=True, text=True,
                            check=True, stdin=subprocess.DEVNULL).stdout
    assert "@@toa-file /etc/os-release" in output and "@@toa-file /usr/lib/os-release" not in output
    remote, local = detect.identify(detect.parse_remote_facts(output)), detect.identify(detect.read_local())
    assert (remote.distro, remote.version, remote.target) == (local.distro, local.version, local.target)
