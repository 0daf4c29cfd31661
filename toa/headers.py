"""Install the kernel headers (kernel-devel) that match a kernel, with the family's package manager.

Works through anything with invoke's `run` (a local invoke Context or a Fabric Connection), so the
same code installs on this machine and on a host over SSH.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Callable

from toa import kernel as kernels
from toa.detect import Platform
from toa.errors import ToaError


@dataclass(frozen=True)
class Available:
    release: str  # the kernel release the package is for
    spec: str  # what to hand the package manager


def _run(runner, command: str):
    return runner.run(command, hide=True, warn=True, in_stream=False)


def parse_apt_pkgnames(out: str) -> list[Available]:
    """`apt-cache pkgnames linux-headers-` output: ABI packages only, not the -common halves nor
    metapackages like linux-headers-6.12-cloud-amd64. Pure."""
    return [
        Available(name[len("linux-headers-"):], name)
        for name in sorted(set(out.split()))
        if re.fullmatch(r"linux-headers-\d+\.\d+\.\d+\S*", name) and not re.search(r"-common(-rt)?$", name)
    ]


def parse_rpm_list(out: str) -> list[Available]:
    """`yum/dnf list --showduplicates kernel-devel` output. Pure."""
    found = []
    for arch, version in re.findall(r"^kernel-devel\.(\S+)\s+(\S+)", out, re.M):
        version = version.split(":", 1)[-1]  # drop an epoch
        found.append(Available(f"{version}.{arch}", f"kernel-devel-{version}.{arch}"))
    return found


def parse_zypper_search(out: str) -> list[Available]:
    """`zypper se -s -x kernel-default-devel` output. Pure."""
    found = []
    for version in re.findall(r"\|\s*kernel-default-devel\s*\|\s*package\s*\|\s*(\S+)\s*\|", out):
        release = version.rsplit(".", 1)[0] + "-default"  # 5.14.21-150400.24.46.1 runs as ...46-default
        found.append(Available(release, f"kernel-default-devel={version}"))
    return found


@dataclass(frozen=True)
class PackageManager:
    list_command: str  # lists the headers packages the repositories offer
    parse: Callable[[str], list[Available]]
    install: str
    download: str  # how to fetch the package file by hand, and install it: for the error message
    by_hand: str


_MANAGERS = {
    "apt": PackageManager("apt-cache pkgnames linux-headers-", parse_apt_pkgnames,
                          "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {spec}",
                          "apt-get download {spec}", "apt-get install ./{spec}_*.deb"),
    "yum": PackageManager("yum -q list --showduplicates kernel-devel", parse_rpm_list, "yum install -y {spec}",
                          "yumdownloader {spec}", "yum localinstall {spec}.rpm"),
    "dnf": PackageManager("dnf -q list --showduplicates kernel-devel", parse_rpm_list, "dnf install -y {spec}",
                          "dnf download {spec}", "dnf install ./{spec}.rpm"),
    "zypper": PackageManager("zypper --non-interactive -q se -s -x kernel-default-devel", parse_zypper_search,
                             "zypper --non-interactive install {spec}", "zypper download {spec}",
                             "rpm -i kernel-default-devel-*.rpm"),
}


def _numbers(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release)[:4])


def nearest(release: str, available: list[Available], count: int = 4) -> list[str]:
    """The COUNT available releases closest to RELEASE, comparing version numbers left to right."""
    wanted = _numbers(release)

    def distance(candidate: str) -> tuple[int, ...]:
        return tuple(abs(a - b) for a, b in zip(_numbers(candidate), wanted))

    return sorted({a.release for a in available}, key=lambda r: (distance(r), kernels.version_key(r)))[:count]


@dataclass(frozen=True)
class Outcome:
    package: str
    path: str
    installed: bool  # False: it was already there, nothing done


def install(runner, platform: Platform, release: str | None = None) -> Outcome:
    """Install the headers for RELEASE (default: the platform's running kernel)."""
    release = kernels.validate_release(release or platform.kernel or "")
    target = platform.target
    if target is None:
        raise ToaError(f"{platform.name} is not a supported distro: build toa.ko elsewhere with `invoke build --kernel {release}`")
    package, path = target.headers_for(release)
    if target.package_manager not in _MANAGERS:
        raise ToaError(
            f"{target.name} installs no packages on the host: build toa.ko elsewhere with `invoke build --kernel {release}`"
        )
    if _run(runner, f"test -e {shlex.quote(path)}/Makefile").ok:
        return Outcome(package, path, installed=False)
    manager = _MANAGERS[target.package_manager]
    as_root = "" if _run(runner, "id -u").stdout.strip() == "0" else "sudo -n "  # sudo only where needed
    if target.package_manager == "apt":
        _run(runner, as_root + "apt-get update -q")
    available = manager.parse(_run(runner, manager.list_command).stdout)
    match = next((a for a in available if a.release == release), None)
    if match is None:
        close = nearest(release, available)
        raise ToaError(
            f"no package {package} in {platform.name}'s configured repositories "
            f"(nearest available: {', '.join(close) if close else 'none'}); get the package file for this exact kernel "
            f"({manager.download.format(spec=package)} on a machine that has it) and install it by hand "
            f"({manager.by_hand.format(spec=package)}), or boot a kernel that has headers"
        )
    result = _run(runner, as_root + manager.install.format(spec=shlex.quote(match.spec)))
    if result.failed:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToaError(f"installing {match.spec} failed (exit {result.exited}): {tail[0]}")
    return Outcome(package, path, installed=True)
