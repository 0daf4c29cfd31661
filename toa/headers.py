"""Install the kernel headers (kernel-devel) that match a kernel, with the family's package manager.

Works through anything with invoke's `run` (a local invoke Context or a Fabric Connection), so the
same code installs on this machine and on a host over SSH.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from toa import kernel as kernels
from toa.detect import Platform
from toa.errors import ToaError


@dataclass(frozen=True)
class Available:
    release: str  # the kernel release the package is for
    spec: str  # what to hand the package manager


def _run(runner, command: str, *, root: bool = False):
    if root and _needs_sudo(runner):
        command = "sudo -n " + command
    return runner.run(command, hide=True, warn=True, in_stream=False)


def _needs_sudo(runner) -> bool:
    result = runner.run("id -u", hide=True, warn=True, in_stream=False)
    return result.stdout.strip() != "0"


def _apt_available(runner) -> list[Available]:
    out = _run(runner, "apt-cache pkgnames linux-headers-").stdout
    names = sorted(set(out.split()))
    # ABI packages only: not the -common halves nor metapackages like linux-headers-6.12-cloud-amd64
    return [
        Available(n[len("linux-headers-"):], n)
        for n in names
        if re.fullmatch(r"linux-headers-\d+\.\d+\.\d+\S*", n) and not re.search(r"-common(-rt)?$", n)
    ]


def _rpm_available(runner, manager: str) -> list[Available]:
    out = _run(runner, f"{manager} -q list --showduplicates kernel-devel").stdout
    found = []
    for name, version in re.findall(r"^kernel-devel\.(\S+)\s+(\S+)", out, re.M):
        version = version.split(":", 1)[-1]
        found.append(Available(f"{version}.{name}", f"kernel-devel-{version}.{name}"))
    return found


def _zypper_available(runner) -> list[Available]:
    out = _run(runner, "zypper --non-interactive -q se -s -x kernel-default-devel").stdout
    found = []
    for version in re.findall(r"\|\s*kernel-default-devel\s*\|\s*package\s*\|\s*(\S+)\s*\|", out):
        release = version.rsplit(".", 1)[0] + "-default"  # 5.14.21-150400.24.46.1 runs as ...46-default
        found.append(Available(release, f"kernel-default-devel={version}"))
    return found


_MANAGERS = {
    "apt": (_apt_available, "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {spec}", "apt-get download {spec}", "apt-get install ./{spec}_*.deb"),
    "yum": (lambda r: _rpm_available(r, "yum"), "yum install -y {spec}", "yumdownloader {spec}", "yum localinstall {spec}.rpm"),
    "dnf": (lambda r: _rpm_available(r, "dnf"), "dnf install -y {spec}", "dnf download {spec}", "dnf install ./{spec}.rpm"),
    "zypper": (_zypper_available, "zypper --non-interactive install {spec}", "zypper download {spec}", "rpm -i kernel-default-devel-*.rpm"),
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
    list_available, install_cmd, download_cmd, by_hand = _MANAGERS[target.package_manager]
    if target.package_manager == "apt":
        _run(runner, "apt-get update -q", root=True)
    available = list_available(runner)
    match = next((a for a in available if a.release == release), None)
    if match is None:
        close = nearest(release, available)
        raise ToaError(
            f"no package {package} in {platform.name}'s configured repositories "
            f"(nearest available: {', '.join(close) if close else 'none'}); get the package file for this exact kernel "
            f"({download_cmd.format(spec=package)} on a machine that has it) and install it by hand "
            f"({by_hand.format(spec=package)}), or boot a kernel that has headers"
        )
    result = _run(runner, install_cmd.format(spec=shlex.quote(match.spec)), root=True)
    if result.failed:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToaError(f"installing {match.spec} failed (exit {result.exited}): {tail[0]}")
    return Outcome(package, path, installed=True)
