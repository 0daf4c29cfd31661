"""A kernel upgrade never silently loses toa, proven end to end in the lab fleet.

One guest per path boots the newest bookworm kernel and gets toa through `invoke deploy` (with an
option). Then the newer kernel bookworm-security carries (6.12 today; both resolved from the mirror
when the test runs) is installed in the guest with apt, from its .deb files downloaded here, as an
administrator upgrades a host: Debian's own kernel and headers packages run their hooks, and toa's
(kmod path) or DKMS's (DKMS path) builds toa.ko for that kernel inside the guest. `invoke status`
must say the next boot is covered (and, with toa's hook disabled, that it is not). The guest is then
powered off and booted into the new kernel (QEMU's -kernel with that kernel's vmlinuz, the same
disk), where toa must be loaded at boot with its option and `TOA: toa loaded` in that boot's log.
"""

from __future__ import annotations

import contextlib

import pytest

from tests.cli import json_items, toa
from toa import build, debian, guests
from toa import kernel as kernels
from toa.deploy.apply import LOADED_MESSAGE

GUEST_MEMORY_MB = 1024  # gcc compiling toa.ko in the guest
OPTION = "kinds=254,200"
# A first boot of a kernel with its full module set (udev loads what it finds) is slow under TCG.
BOOT_SECONDS = 600
UPLOADS = "/root/upgrade"
HOOKS = ("/etc/kernel/postinst.d/zz-toa", "/etc/kernel/header_postinst.d/zz-toa")
# Each test installs a kernel and compiles toa.ko inside a TCG guest: many minutes.
pytestmark = [pytest.mark.lab, pytest.mark.docker, pytest.mark.ssh, pytest.mark.network, pytest.mark.slow,
              pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def upgrade():
    """(running, newer, newer's packages): the newest bookworm kernel, and the newer series
    bookworm-security carries."""
    _, running = debian.prepare(None, "bookworm")
    newer_packages, newer = debian.prepare(None, "bookworm-security")
    assert kernels.version_key(running.release) < kernels.version_key(newer.release), (running, newer)
    return running, newer, newer_packages


@pytest.fixture(scope="module")
def newer_debs(upgrade):
    """The newer kernel's image, headers, -common and kbuild .debs, as a host's apt would fetch them."""
    return debian.kernel_debs(upgrade[2])


@pytest.fixture(scope="module")
def dist(upgrade, tmp_path_factory):
    """toa.ko built here for the running kernel only: the newer one's comes from the guest's hooks."""
    out = tmp_path_factory.mktemp("dist")
    build.build_kernel(kernel=upgrade[0].release, out_dir=out)
    return out


@contextlib.contextmanager
def _guest(tree, workdir):
    """One guest on TREE's kernel, on a userland that can build modules (gcc, make)."""
    with guests.fleet([tree], workdir, count=1, memory_mb=GUEST_MEMORY_MB,
                      extra_packages=guests.BUILD_HOST_PACKAGES) as fleet:
        yield fleet[0]


def _fleet_args(guest, tmp_path, dist):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(guest.node_line() + "\n")
    return ["--hosts", str(nodes), "--key", str(guest.key_path), "--known-hosts", str(guest.known_hosts),
            "--dist", str(dist)]


def _deploy(guest, tmp_path, dist):
    result = toa("deploy", *_fleet_args(guest, tmp_path, dist), "--option", OPTION, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    row = json_items(result, "deploy")[0]
    assert row["action"] == "installed", row
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"


def _status(guest, tmp_path, dist):
    result = toa("status", *_fleet_args(guest, tmp_path, dist), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json_items(result, "status")[0]


def _upload(guest, files):
    guest.run(f"mkdir -p {UPLOADS}")
    with guest.connect() as conn:
        for path in files:
            conn.put(str(path), f"{UPLOADS}/{path.name}")
    return [f"{UPLOADS}/{path.name}" for path in files]


def _apt_install(guest, files, *flags):
    """apt-get install of package files, as an administrator does (the guest's apt has no package
    lists: every dependency is in its userland or among FILES); the output of the packages' scripts
    included. (No --no-download: with package files, apt 2.6 fails on it, "Pathname to install is
    not absolute".)"""
    return guest.run("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                     f"{' '.join(flags)} {' '.join(files)} 2>&1")


def _lean_initramfs(guest):
    """The kernel package makes an initramfs (its hook); the guest boots QEMU's -kernel with toa's own,
    so keep the package's small and quick to make under TCG."""
    guest.run("echo MODULES=list > /etc/initramfs-tools/conf.d/toa-test")


def _boots_with_toa(guest, newer, module_file):
    """Boot NEWER on the guest's disk: toa loads at boot from MODULE_FILE (a path, or its start where
    the file may be compressed), with the deployed option."""
    guest.boot_kernel(newer, timeout=BOOT_SECONDS)
    assert guest.run("uname -r").strip() == newer.release
    loaded_from = guest.run("modinfo -n toa").strip()
    assert loaded_from.startswith(module_file), loaded_from
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"
    assert guest.run(f"modinfo -F srcversion {loaded_from}").strip() == guest.run("cat /sys/module/toa/srcversion").strip()
    # that boot's kernel log: loaded once, at boot, by systemd-modules-load
    assert guest.run("journalctl -k -b 0 -o cat").count(LOADED_MESSAGE) == 1
    assert guest.run("systemctl show -p ExecMainStatus systemd-modules-load").strip() == "ExecMainStatus=0"


def test_kmod_path_the_hook_builds_toa_for_the_new_kernel_and_it_loads_there(upgrade, newer_debs, dist, tmp_path):
    running, newer, _ = upgrade
    with _guest(running, tmp_path / "guest") as guest:
        _deploy(guest, tmp_path, dist)
        source_dir = guest.run("ls -d /usr/src/toa-kmod-*").strip()
        assert guest.run(f"ls {source_dir}").split() == sorted(["Kbuild", "Makefile", "probes", "toa.c", "toa_compat.h"])
        _lean_initramfs(guest)
        files = _upload(guest, newer_debs)

        # with toa's hooks disabled (run-parts skips a file that is not executable), the new kernel
        # goes in without toa.ko, and status says its boot will lack toa
        guest.run(f"chmod -x {' '.join(HOOKS)}")
        _apt_install(guest, files)
        row = _status(guest, tmp_path, dist)
        assert (row["next_kernel"], row["next_boot"]) == (newer.release, f"NO toa.ko: {newer.release} boots without toa")

        # hooks enabled: reinstalling the headers package runs them the way apt does on an upgrade
        guest.run(f"chmod +x {' '.join(HOOKS)}")
        headers = [path for path in files if f"linux-headers-{newer.release}_" in path]
        output = _apt_install(guest, headers, "--reinstall")
        assert f"toa: built toa.ko for kernel {newer.release} from {source_dir}" in output, output[-3000:]
        row = _status(guest, tmp_path, dist)
        assert (row["next_kernel"], row["next_boot"]) == (newer.release, "toa.ko in place")

        _boots_with_toa(guest, newer, f"/lib/modules/{newer.release}/extra/toa.ko")


def test_dkms_path_dkms_builds_toa_for_the_new_kernel_and_it_loads_there(upgrade, newer_debs, dist, tmp_path):
    running, newer, _ = upgrade
    packages = tmp_path / "packages"
    made = toa("package", "--format", "dkms", "--out", str(packages), "--json")
    assert made.returncode == 0, made.stdout + made.stderr
    toa_dkms = next(packages.glob("toa-dkms_*_all.deb"))
    dkms = debian.download("bookworm", ["dkms"], tmp_path / "dkms")
    with _guest(running, tmp_path / "guest") as guest:
        _deploy(guest, tmp_path, dist)
        _lean_initramfs(guest)
        # DKMS and toa-dkms from files: the running kernel has no headers here, so DKMS builds nothing yet
        output = _apt_install(guest, _upload(guest, [*dkms, toa_dkms]))
        assert "toa" in guest.run("dkms status"), output[-3000:]

        # the new kernel: DKMS's hooks build toa for it; toa's own hooks see it and stay quiet
        output = _apt_install(guest, _upload(guest, newer_debs))
        assert f"toa/{toa_dkms.name.split('_')[1]}, {newer.release}, x86_64: installed" in guest.run("dkms status"), \
            output[-3000:]
        assert "toa: kernel" not in output and "toa: built" not in output, output[-3000:]
        row = _status(guest, tmp_path, dist)
        assert (row["next_kernel"], row["next_boot"]) == (newer.release, "toa.ko in place")

        # DKMS's place (compressed like the kernel's own modules where its dkms does that)
        _boots_with_toa(guest, newer, f"/lib/modules/{newer.release}/updates/dkms/toa.ko")
