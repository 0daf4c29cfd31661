"""The supported build targets, loaded from targets.toml (one table per distro release)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from importlib import resources

from toa.errors import ToaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Target:
    id: str
    name: str
    family: str
    distro: str
    version: str
    image: str
    build: str
    container: str
    package_manager: str
    headers_package: str
    headers_path: str
    autoload: str
    compiler: str
    kernels: tuple[str, ...]
    hwe_kernels: tuple[str, ...] = field(default=())

    def headers_for(self, release: str) -> tuple[str, str]:
        """The headers package and path for a kernel release on this target."""
        kver = release.rsplit("-", 1)[0] if self.family == "suse" else release
        values = {"release": release, "kver": kver, "kver_base": kver.split("-", 1)[0]}
        return self.headers_package.format(**values), self.headers_path.format(**values)

    def autoload_for(self, init: str) -> str:
        """How a host of this target with INIT (systemd, sysv, other) loads modules at boot: the target's
        style, or where that needs systemd and the host has none, the way its family does without it."""
        if self.autoload != "modules-load.d" or init == "systemd":
            return self.autoload
        without_systemd = {"debian": "etc-modules", "rhel": "sysconfig-modules", "suse": "sysconfig-kernel"}
        if self.family not in without_systemd:
            raise ToaError(f"{self.id} loads modules at boot only through systemd, and this host runs {init}")
        return without_systemd[self.family]

    def matches(self, name: str) -> bool:
        """True if NAME picks this target: its id, its distro or its family."""
        return name in (self.id, self.distro, self.family)


@functools.cache
def all_targets() -> dict[str, Target]:
    text = resources.files("toa").joinpath("targets.toml").read_text()
    return {
        tid: Target(
            id=tid,
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
        )
        for tid, fields in tomllib.loads(text).items()
    }


def get(target_id: str) -> Target:
    try:
        return all_targets()[target_id]
    except KeyError:
        raise ToaError(
            f"unknown target {target_id!r}: choose one of {', '.join(all_targets())}"
        ) from None


def for_os(distro: str, version: str) -> Target | None:
    """The target of an installed OS, from its os-release ID and VERSION_ID."""
    major = version.split(".")[0]
    for target in all_targets().values():
        if target.distro != distro:
            continue
        if target.version in ("", version) or (
            target.family in ("rhel", "suse") and target.version == major
        ):
            return target
    return None


def for_kernel_key(key: str, *, hwe: bool = False) -> list[Target]:
    """Targets that ship kernels of KEY (see toa.kernel) as their own, or with HWE=True, that
    can also run them (Ubuntu's hardware-enablement kernels and the like)."""
    return [t for t in all_targets().values() if key in (t.hwe_kernels if hwe else t.kernels)]
