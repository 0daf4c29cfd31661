"""`headers` installs real packages with the real package manager of this (Debian 12) machine."""

import os
import re
import subprocess

import pytest

from tests.cli import assert_one_line_error, toa
from toa.headers import Available, nearest


def test_nearest_versions_are_the_closest_by_number():
    available = [Available(r, "pkg") for r in
                 ["5.10.0-40-amd64", "6.1.0-54-amd64", "6.1.0-55-amd64", "6.12.110+deb12-amd64", "4.19.0-27-amd64"]]
    assert nearest("6.1.0-56-amd64", available, count=2) == ["6.1.0-55-amd64", "6.1.0-54-amd64"]
    assert nearest("6.12.112+deb12-amd64", available, count=1) == ["6.12.110+deb12-amd64"]


def test_running_kernel_without_a_package_is_a_clear_error():
    running = os.uname().release
    listed = subprocess.run(["apt-cache", "pkgnames", "linux-headers-"], capture_output=True, text=True).stdout.split()
    if f"linux-headers-{running}" in listed:
        pytest.skip(f"this machine's repositories do carry headers for {running}")
    result = toa("headers")
    assert_one_line_error(result, f"no package linux-headers-{running}", "nearest available:", "by hand")
    assert result.returncode == 2


def test_hostile_kernel_is_rejected_before_anything_runs():
    assert_one_line_error(toa("headers", "--kernel", "6.1.0-56-amd64;reboot"), "invalid kernel release")


def _current_bookworm_abi():
    names = subprocess.run(["apt-cache", "pkgnames", "linux-headers-6.1.0-"], capture_output=True, text=True).stdout
    abis = sorted({m for m in re.findall(r"linux-headers-(6\.1\.0-\d+-amd64)\b", names)},
                  key=lambda r: int(r.split("-")[1]))
    if not abis:
        pytest.skip("no Debian 6.1 headers in this machine's repositories")
    return abis[-1]


@pytest.mark.ssh
@pytest.mark.network
def test_installs_real_headers_then_finds_them_in_place(sshd):
    """A real apt install of a real headers package; the second run (over SSH) has nothing to do."""
    release = _current_bookworm_abi()
    first = toa("headers", "--kernel", release)
    assert first.returncode == 0, first.stderr
    assert re.search(rf"(installed|already installed, nothing to do:) linux-headers-{re.escape(release)}", first.stdout)
    assert os.path.isfile(f"/usr/src/linux-headers-{release}/Makefile")
    again = toa("headers", "--kernel", release, "--host", f"{sshd.user}@{sshd.host}:{sshd.port}",
                "--key", str(sshd.key_path), "--known-hosts", str(sshd.known_hosts_path))
    assert again.returncode == 0, again.stderr
    assert f"already installed, nothing to do: linux-headers-{release}" in again.stdout


# Recorded outputs of the package managers of the other families (this machine has only apt).
YUM_LIST = """Installed Packages
kernel-devel.x86_64                  3.10.0-1160.el7                    @base
Available Packages
kernel-devel.x86_64                  3.10.0-1160.el7                    base
kernel-devel.x86_64                  3.10.0-1160.119.1.el7              updates
"""
DNF_LIST = """Available Packages
kernel-devel.x86_64                4.18.0-513.5.1.el8_9                 appstream
kernel-devel.x86_64                4.18.0-553.el8_10                    appstream
"""
ZYPPER_SEARCH = """S | Name                 | Type    | Version                | Arch   | Repository
--+----------------------+---------+------------------------+--------+------------------------------
  | kernel-default-devel | package | 5.14.21-150500.55.52.1 | x86_64 | Update repository with updates
  | kernel-default-devel | package | 5.14.21-150500.53.2    | x86_64 | Main Repository
"""


def test_rpm_and_zypper_listings_parse():
    from toa.headers import parse_rpm_list, parse_zypper_search

    assert [a.release for a in parse_rpm_list(YUM_LIST)] == [
        "3.10.0-1160.el7.x86_64", "3.10.0-1160.el7.x86_64", "3.10.0-1160.119.1.el7.x86_64"]
    assert parse_rpm_list(DNF_LIST)[0] == Available("4.18.0-513.5.1.el8_9.x86_64", "kernel-devel-4.18.0-513.5.1.el8_9.x86_64")
    assert parse_zypper_search(ZYPPER_SEARCH) == [
        Available("5.14.21-150500.55.52-default", "kernel-default-devel=5.14.21-150500.55.52.1"),
        Available("5.14.21-150500.53-default", "kernel-default-devel=5.14.21-150500.53.2"),
    ]


def test_apt_pkgnames_keep_abi_packages_only():
    from toa.headers import parse_apt_pkgnames

    out = "linux-headers-6.1.0-56-amd64\nlinux-headers-6.1.0-56-common\nlinux-headers-amd64\nlinux-headers-6.12-cloud-amd64\n"
    assert [a.release for a in parse_apt_pkgnames(out)] == ["6.1.0-56-amd64"]
