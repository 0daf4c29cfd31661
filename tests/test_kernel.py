"""Kernel releases: validation, classification to family/distro/target, partial resolution."""

import pytest

from tests.cli import assert_one_line_error, toa
from toa import kernel
from toa.errors import ToaError


@pytest.mark.parametrize(
    "partial, full, target",
    [
        ("3.10.0-693", "3.10.0-693.el7.x86_64", "centos-7"),
        ("2.6.32-754", "2.6.32-754.el6.x86_64", "centos-6"),
        ("4.18.0-348", "4.18.0-348.el8.x86_64", "rocky-8"),
        ("4.18.0-513.5.1", "4.18.0-513.5.1.el8_9.x86_64", "rocky-8"),
        ("5.14.0-362.8.1", "5.14.0-362.8.1.el9_3.x86_64", "rocky-9"),
        ("5.4.0-150", "5.4.0-150-generic", "ubuntu-20.04"),
        ("6.1.0-56", "6.1.0-56-amd64", "debian-12"),
        ("6.12.112+deb13", "6.12.112+deb13-amd64", "debian-13"),
        ("4.12.14-122.37", "4.12.14-122.37-default", "sles-12"),
        ("5.14.21-150400.24.46", "5.14.21-150400.24.46-default", "sles-15"),
    ],
)
def test_partial_releases_complete(partial, full, target):
    resolved = kernel.resolve(partial)
    assert (resolved.kernel.release, resolved.target.id) == (full, target)


def test_rebuilds_share_one_el_build():
    resolved = kernel.resolve("4.18.0-348.el8.x86_64")
    assert resolved.kernel.distro == "el"
    assert {t.id for t in resolved.kernel.targets} == {"centos-stream-8", "rhel-8", "rocky-8", "almalinux-8"}
    assert resolved.kernel.builds == {"el8"}


def test_ambiguous_release_lists_candidates_and_the_flag():
    with pytest.raises(ToaError) as err:
        kernel.resolve("4.4.0-210")
    message = str(err.value)
    assert "4.4.0-210-generic (ubuntu-16.04)" in message and "4.4.0-210-default (sles-12)" in message
    assert "--distro" in message
    assert kernel.resolve("4.4.0-210", "sles-12").kernel.release == "4.4.0-210-default"
    assert kernel.resolve("4.4.0-210", "ubuntu").kernel.release == "4.4.0-210-generic"


def test_hwe_kernel_is_chosen_with_distro():
    assert kernel.resolve("5.4.0-150-generic").target.id == "ubuntu-20.04"
    assert kernel.resolve("5.4.0-150-generic", "ubuntu-18.04").target.id == "ubuntu-18.04"
    with pytest.raises(ToaError, match="ambiguous"):
        kernel.resolve("5.4.0-150-generic", "ubuntu")


def test_distro_that_does_not_own_the_kernel():
    with pytest.raises(ToaError, match="not a sles-15 kernel"):
        kernel.resolve("5.4.0-150-generic", "sles-15")
    with pytest.raises(ToaError, match="unknown distro"):
        kernel.resolve("5.4.0-150-generic", "gentoo")


def test_unknown_kernel_says_what_to_give():
    with pytest.raises(ToaError, match="as `uname -r` prints it"):
        kernel.resolve("6.18.44-custom")
    assert kernel.classify("6.18.44-custom") is None


HOSTILE = ["", "6.1.0-56-amd64;reboot", "$(id)", "6.1.0`id`", "6.1.0 56", "../../etc/passwd", "6.1/0",
           "6.1.0\n-56", "-rf", "6.1..0", "6.1.0|x", "6.1.0&x", "6.1.0>x", "6.1.0'x", '6.1.0"x', "9" * 101]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_releases_are_rejected(text):
    with pytest.raises(ToaError):
        kernel.validate_release(text)
    with pytest.raises(ToaError):
        kernel.resolve(text)


def test_hostile_release_on_the_command_line_is_one_line():
    result = toa("headers", "--kernel", "6.1.0$(touch /tmp/toa-pwned)")
    assert_one_line_error(result, "invalid kernel release")
