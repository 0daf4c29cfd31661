"""Kernel releases: validate, classify to a distro family and target, complete partial releases.

A release is what `uname -r` prints. Each family names its kernels its own way; the patterns below
turn a release into a *kernel key* (el7, ubuntu-5.4, deb13, suse-150, ...) and targets.toml says
which targets ship kernels of each key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toa import targets
from toa.errors import ToaError
from toa.targets import Target

MAX_RELEASE = 100
# Letters, digits and . _ + ~ - only, starting with a digit: no shell metacharacters, no paths,
# no leading '-' that a command could read as an option.
_SAFE_RELEASE = re.compile(r"[0-9][0-9A-Za-z._+~-]*")

_ARCH = r"(?:x86_64|aarch64|ppc64le|s390x|i686)"
_DEBIAN_FLAVOUR = r"(?:amd64|arm64|cloud-amd64|cloud-arm64|rt-amd64|rt-arm64|686|686-pae|armmp|armmp-lpae)"
_SUSE_FLAVOUR = r"(?:default|azure|rt|preempt|kvmsmall|xen|pae|ec2|64kb|trace)"

# (family, pattern, function from match to kernel key); first match wins.
_FAMILIES = [
    (
        "rhel",
        re.compile(rf"(\d+\.\d+\.\d+)-(\d+(?:\.\d+)*)\.el(?P<major>\d+)(?:_\d+)?(?:\.{_ARCH})?(?:\+\w+)?"),
        lambda m: f"el{m['major']}",
    ),
    (
        "coreos",
        re.compile(rf"(\d+\.\d+\.\d+)-(\d+)\.fc(?P<fedora>\d+)\.{_ARCH}"),
        lambda m: "fedora",
    ),
    (
        "debian",
        re.compile(rf"(?P<series>\d+\.\d+)\.0-(\d+)-{_DEBIAN_FLAVOUR}"),
        lambda m: f"debian-{m['series']}",
    ),
    (
        "debian",
        re.compile(rf"(\d+\.\d+\.\d+)\+deb(?P<deb>\d+)-{_DEBIAN_FLAVOUR}"),
        lambda m: f"deb{m['deb']}",
    ),
    (
        "debian",
        re.compile(r"(?P<series>\d+\.\d+)\.0-(\d+)-(?:generic|lowlatency|aws|azure|gcp|gke|kvm|oracle|ibm|virtual|generic-64k|generic-lpae|nvidia|raspi)"),
        lambda m: f"ubuntu-{m['series']}",
    ),
    (
        "suse",
        re.compile(rf"(?P<series>\d+\.\d+)\.\d+-(?P<build>\d+(?:\.\d+)*|lp15\d(?:\.\d+)*)-{_SUSE_FLAVOUR}"),
        lambda m: (
            "suse-150" if re.match(r"150\d00\.", m["build"])
            else "leap-15" if m["build"].startswith("lp15")
            else f"suse-{m['series']}"
        ),
    ),
    ("coreos", re.compile(r"(\d+\.\d+\.\d+)-coreos(?:-r\d+)?"), lambda m: "coreos"),
    ("coreos", re.compile(r"(\d+\.\d+\.\d+)-flatcar"), lambda m: "flatcar"),
]

# RHEL 8/9 z-stream kernels carry the minor release (.el8_9): the first build number tells it.
_EL_MINOR_BY_BUILD = {
    8: {80: 0, 147: 1, 193: 2, 240: 3, 305: 4, 348: 5, 372: 6, 425: 7, 477: 8, 513: 9, 553: 10},
    9: {70: 0, 162: 1, 284: 2, 362: 3, 427: 4, 503: 5, 570: 6, 611: 7},
}
_EL_MAJOR_BY_VERSION = {"2.6.32": 6, "3.10.0": 7, "4.18.0": 8, "5.14.0": 9}


@dataclass(frozen=True)
class Kernel:
    """A full kernel release and the targets whose distros ship it."""

    release: str
    family: str
    key: str
    targets: tuple[Target, ...]  # its own distro releases first, then those that also run it
    own: int  # how many of TARGETS ship it as their own kernel

    @property
    def default_targets(self) -> tuple[Target, ...]:
        return self.targets[: self.own] or self.targets

    @property
    def distro(self) -> str:
        """The distro of its targets, or the family where several distros share it (el: RHEL
        and its rebuilds)."""
        if self.family == "rhel":
            return "el"
        distros = {t.distro for t in self.targets}
        return distros.pop() if len(distros) == 1 else self.family

    @property
    def builds(self) -> set[str]:
        return {t.build for t in self.targets}


def version_key(release: str) -> list:
    """Sort key for releases: numbers compare as numbers and rank above words (as rpm does)."""
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[.\-+~_]", release)]


def validate_release(text: str) -> str:
    """Return TEXT if it can be a kernel release; else a ToaError. Runs before TEXT goes anywhere."""
    if not isinstance(text, str) or not text:
        raise ToaError("no kernel release given: pass one as `uname -r` prints it, e.g. 3.10.0-693.el7.x86_64")
    if len(text) > MAX_RELEASE or not _SAFE_RELEASE.fullmatch(text) or ".." in text:
        shown = repr(text[:60] + ("..." if len(text) > 60 else ""))
        raise ToaError(
            f"invalid kernel release {shown}: use the release as `uname -r` prints it "
            "(digits, letters and . _ + ~ - only, at most 100 characters)"
        )
    return text


def classify(release: str) -> Kernel | None:
    """The family, key and targets of a full release; None if no supported distro ships it.

    Targets come in order: the releases whose own kernel this is, then those that can also run it
    (Ubuntu HWE and the like).
    """
    validate_release(release)
    for family, pattern, key_of in _FAMILIES:
        match = pattern.fullmatch(release)
        if match:
            key = key_of(match)
            own = targets.for_kernel_key(key)
            also = targets.for_kernel_key(key, hwe=True)
            if not own + also:
                return None
            return Kernel(release, family, key, tuple(own + also), len(own))
    return None


def _completions(partial: str) -> list[str]:
    """Full releases a partial one (no flavour or dist tag, e.g. 3.10.0-693) may stand for."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-(\d+)((?:\.\d+)*)", partial)
    if m:
        version, build, zstream = m.groups()
        out = [f"{partial}-amd64", f"{partial}-generic", f"{partial}-default"]
        major = _EL_MAJOR_BY_VERSION.get(version)
        if major:
            minor = _EL_MINOR_BY_BUILD.get(major, {}).get(int(build))
            if zstream and minor is not None:
                out.append(f"{partial}.el{major}_{minor}.x86_64")
            elif not zstream or major < 8:
                out.append(f"{partial}.el{major}.x86_64")
        return out
    if re.fullmatch(r"\d+\.\d+\.\d+\+deb\d+", partial):
        return [f"{partial}-amd64"]
    return []


@dataclass(frozen=True)
class Resolution:
    kernel: Kernel
    target: Target


def resolve(text: str, distro: str | None = None) -> Resolution:
    """Turn a full or partial release into one kernel and the target to build it for.

    DISTRO (a target id, distro id or family) narrows the choice and unlocks HWE kernels.
    """
    validate_release(text)
    if distro is not None and not any(t.matches(distro) for t in targets.all_targets().values()):
        raise ToaError(
            f"unknown distro {distro!r}: give a target ({', '.join(targets.all_targets())}) or a distro id"
        )
    candidates = [k for k in [classify(text)] if k] or [k for k in map(classify, _completions(text)) if k]
    if not candidates:
        raise ToaError(
            f"kernel {text!r} is not one toa can place in a supported distro: give the full release "
            "as `uname -r` prints it on the host (e.g. 3.10.0-693.el7.x86_64, 5.4.0-150-generic, "
            "6.1.0-56-amd64), or build against its headers with --headers"
        )
    if distro is None:
        if any(k.own for k in candidates):  # a distro's own kernel beats one only an HWE stack runs
            candidates = [k for k in candidates if k.own]
        choices = [(k, t) for k in candidates for t in k.default_targets]
    else:
        choices = [(k, t) for k in candidates for t in k.targets if t.matches(distro)]
        if not choices:
            owners = ", ".join(t.id for k in candidates for t in k.targets)
            raise ToaError(f"kernel {text!r} is not a {distro} kernel (it belongs to {owners}): drop or fix --distro")
    by_build = {(k.release, t.build): (k, t) for k, t in choices}
    if len(by_build) > 1:
        listed = "; ".join(
            f"{k.release} ({', '.join(t.id for k2, t in choices if k2 is k)})" for k in dict.fromkeys(k for k, _ in choices)
        )
        raise ToaError(
            f"kernel {text!r} is ambiguous: {listed}; pick one with --distro TARGET (e.g. --distro {choices[0][1].id})"
        )
    kernel, target = choices[0]
    return Resolution(kernel, target)
