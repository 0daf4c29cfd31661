"""The files that make a host load toa.ko at every boot, early, before services start.

Each target's `autoload` style (toa/targets.toml) picks the mechanism:

- modules-load.d     systemd hosts: /etc/modules-load.d/toa.conf, read by systemd-modules-load.
                     Debian-likes without systemd get a line in /etc/modules instead; other
                     families without systemd use their own style below.
- sysconfig-modules  CentOS/RHEL 6 and 7: /etc/sysconfig/modules/toa.modules, an executable sh script
                     that rc.sysinit (6) or rhel-loadmodules.service (7) runs; it loads toa only if
                     toa.ko exists for the running kernel.
- sysconfig-kernel   SLES 11: MODULES_LOADED_ON_BOOT in /etc/sysconfig/kernel (see below).
- coreos-unit        Fedora CoreOS, Flatcar, CoreOS: /lib/modules is read-only, so toa.ko lives in
                     /var/lib/toa/<release>/ and a systemd unit insmods it before network-pre.target.

Every target but the coreos ones also gets /etc/modprobe.d/toa.conf with the module options, so
every modprobe of toa (at boot or by hand) uses them; SLES also gets allow_unsupported_modules 1.

Files come in three kinds (AutoloadFile.kind):

- "file":    toa owns the whole file: write CONTENT with MODE; delete it to undo.
- "lines":   a shared system file (/etc/modules, /etc/sysconfig/kernel) that toa must never
             overwrite: CONTENT is toa's block of lines. merge() adds it to the current text and
             unmerge() takes it out again; both are idempotent.
- "symlink": CONTENT is the link target, relative to the link's directory (how `systemctl enable`
             wires the coreos unit in, so the deploy needs no systemctl for it).

SLES 11 keeps its boot modules in one shell variable of /etc/sysconfig/kernel, a file YaST also
edits. Rewriting the assignment would race YaST and lose its comments, so toa appends its own
assignment, MODULES_LOADED_ON_BOOT="$MODULES_LOADED_ON_BOOT toa": boot.loadmodules sources the
file, so the line extends whatever the distro's assignment above it says, and removing the line is
the whole undo.

SUSE: SLES's modprobe refuses modules SUSE does not support unless allow_unsupported_modules is 1.
SUSE documents exactly one place for it, /etc/modprobe.d/10-unsupported-modules.conf (SLES 11:
/etc/modprobe.d/unsupported-modules); on SLES 15 SP4 and later a file of that name in /etc
overrides suse-module-tools' copy in /lib/modprobe.d. toa writes that file whole with the setting
at 1 (openSUSE allows them already and gets nothing).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import toa
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.lab import render_template
from toa.resources import MODULE_SOURCE, TEMPLATES_DIR
from toa.targets import Target

INITS = ("systemd", "sysv", "other")
MODULE_SUBDIR = "extra"  # where depmod finds out-of-tree modules on every family
COREOS_MODULE_ROOT = "/var/lib/toa"  # writable on every coreos target, kept across OS updates
COREOS_UNIT = "/etc/systemd/system/toa.service"
COREOS_WANTS_LINK = "/etc/systemd/system/sysinit.target.wants/toa.service"
# Fedora CoreOS builds toa.ko at boot, in a container, for a kernel that came without one (after
# an OS update): the unit, its wants link, the host's script, the script run in the container, and
# the module sources (hook_sources), all on the host's writable trees.
COREOS_BUILD_UNIT = "/etc/systemd/system/toa-build.service"
COREOS_BUILD_WANTS_LINK = "/etc/systemd/system/multi-user.target.wants/toa-build.service"
COREOS_BUILD_SCRIPT = "/etc/toa/build-at-boot.sh"
COREOS_CONTAINER_SCRIPT = "/etc/toa/build-in-container.sh"
COREOS_SOURCE_DIR = f"{COREOS_MODULE_ROOT}/src"
# The eBPF engine: its loader and unit as a deploy puts them (/usr/local: the admin's tree, writable on
# CoreOS too; /etc/systemd/system and a wants link, as `systemctl enable` would) and as a package does.
BPF_UNIT_NAME = "toa-bpf.service"
BPF_LOADER = "/usr/local/sbin/toa-bpf"
BPF_UNIT = f"/etc/systemd/system/{BPF_UNIT_NAME}"
BPF_WANTS_LINK = f"/etc/systemd/system/sysinit.target.wants/{BPF_UNIT_NAME}"
PACKAGED_BPF_LOADER = "/usr/sbin/toa-bpf"

# Module parameters, from toa/module/toa.c: kinds is an int array of at most TOA_MAX_KINDS option
# kinds that carry data (2..255). Decimal only: the kernel reads a leading 0 as octal. trusted is a
# list of at most TOA_MAX_TRUSTED CIDRs; empty (the module's default) trusts every source.
MAX_KINDS = 4
MAX_TRUSTED = 16
OPTION_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*")
KINDS_VALUE_RE = re.compile(r"[1-9][0-9]{0,2}(,[1-9][0-9]{0,2})*")
TRUSTED_ENTRY_RE = re.compile(r"[0-9A-Fa-f:.]{2,39}(/[0-9]{1,3})?")
OPTION_NAMES = ("kinds", "trusted")
# What a build in the module's folder leaves behind: never part of the sources toa ships.
BUILD_OUTPUTS = ("*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd", ".*.d", "modules.order", "Module.symvers",
                 "probes.h", "probes.h.tmp", ".tmp_versions")

@dataclass(frozen=True)
class AutoloadFile:
    path: str  # absolute path on the target host
    content: str
    mode: int  # permissions of a file toa creates (0o755 for scripts)
    kind: str = "file"  # "file", "lines" or "symlink": see the module docstring

    def as_dict(self) -> dict:
        return {"path": self.path, "content": self.content, "mode": f"{self.mode:04o}", "kind": self.kind}

    def merge(self, existing: str | None) -> str:
        """The file's new text given its current text (None: it does not exist yet).

        For "lines": the current text with toa's block at the end, once. A block already in place
        leaves the text as it is; stray copies of its lines (a half-removed block) are dropped first.
        For "file": CONTENT, whatever was there.
        """
        if self.kind == "file":
            return self.content
        if self.kind != "lines":
            raise ValueError(f"{self.path} is a {self.kind}, not text")
        block = self.content.splitlines()
        current = (existing or "").splitlines()
        if _contains_run(current, block):
            return existing
        kept = [line for line in current if line.strip() not in _stripped(block)]
        return "\n".join(kept + block) + "\n"

    def unmerge(self, existing: str) -> str | None:
        """The text with toa's part taken out; None for a file toa owns (delete it)."""
        if self.kind != "lines":
            return None
        block = _stripped(self.content.splitlines())
        kept = [line for line in existing.splitlines() if line.strip() not in block]
        return "\n".join(kept) + "\n" if kept else ""


def _stripped(lines: list[str]) -> set[str]:
    return {line.strip() for line in lines}


def _contains_run(lines: list[str], block: list[str]) -> bool:
    stripped = [line.strip() for line in lines]
    wanted = [line.strip() for line in block]
    return any(stripped[i:i + len(wanted)] == wanted for i in range(len(stripped) - len(wanted) + 1))


def module_path(target: Target, release: str) -> str:
    """Where toa.ko for RELEASE is installed on a host of TARGET."""
    validate_release(release)
    if target.autoload == "coreos-unit":
        return f"{COREOS_MODULE_ROOT}/{release}/toa.ko"
    return f"/lib/modules/{release}/{MODULE_SUBDIR}/toa.ko"


def module_options(options: dict[str, str] | None) -> str:
    """OPTIONS as modprobe/insmod arguments ("kinds=254,253 trusted=10.0.0.0/8"), after strict checks:
    these end up in files root reads at boot."""
    return " ".join(f"{name}={value}" for name, value in module_parameters(options).items() if value)


def module_parameters(options: dict[str, str] | None) -> dict[str, str]:
    """OPTIONS checked and written the way /sys/module/toa/parameters shows them (an empty trusted
    is the module's default: every source)."""
    parameters = {}
    for name, value in (options or {}).items():
        if not isinstance(name, str) or not OPTION_NAME_RE.fullmatch(name):
            raise ToaError(f"invalid module option name {str(name)[:40]!r}: the toa module's options are "
                           f"{' and '.join(OPTION_NAMES)}")
        if name not in OPTION_NAMES:
            raise ToaError(f"unknown module option {name!r}: the toa module's options are kinds (e.g. kinds=254,253) "
                           "and trusted (e.g. trusted=100.64.0.0/10)")
        parameters[name] = _kinds(value) if name == "kinds" else _trusted(value)
    return parameters


def _kinds(value: str) -> str:
    shown = repr(str(value)[:40])
    if not isinstance(value, str) or not KINDS_VALUE_RE.fullmatch(value):
        raise ToaError(f"invalid kinds {shown}: give TCP option kinds as decimal numbers separated by commas, e.g. kinds=254,253")
    kinds = [int(kind) for kind in value.split(",")]
    if len(kinds) > MAX_KINDS:
        raise ToaError(f"invalid kinds {shown}: the module takes at most {MAX_KINDS} option kinds")
    if len(set(kinds)) != len(kinds):
        raise ToaError(f"invalid kinds {shown}: each option kind once")
    bad = [kind for kind in kinds if not 2 <= kind <= 255]
    if bad:
        raise ToaError(f"invalid kinds {shown}: {bad[0]} is not a TCP option kind that carries data (2..255)")
    return ",".join(map(str, kinds))


def _trusted(value: str) -> str:
    """The balancers' source ranges as the module prints them back: every entry with its prefix."""
    if not isinstance(value, str):
        raise ToaError(f"invalid trusted {str(value)[:40]!r}: give CIDRs separated by commas, e.g. trusted=100.64.0.0/10")
    if not value:
        return ""
    shown = repr(value[:60])
    entries = value.split(",")
    if len(entries) > MAX_TRUSTED:
        raise ToaError(f"invalid trusted {shown}: the module takes at most {MAX_TRUSTED} ranges")
    networks = []
    for entry in entries:
        if not TRUSTED_ENTRY_RE.fullmatch(entry):
            raise ToaError(f"invalid trusted {shown}: {entry[:45]!r} is not an IPv4 or IPv6 address or CIDR, "
                           "e.g. trusted=100.64.0.0/10,fd00:1::/64")
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ToaError(f"invalid trusted {shown}: {entry!r} is not an IPv4 or IPv6 address or CIDR, "
                           "e.g. trusted=100.64.0.0/10,fd00:1::/64") from None
        if network.network_address != ipaddress.ip_address(entry.partition("/")[0]):
            raise ToaError(f"invalid trusted {shown}: {entry} has bits set past its prefix; did you mean {network}?")
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
            raise ToaError(f"invalid trusted {shown}: {entry} is IPv4-mapped; IPv4 balancers are matched by their "
                           "IPv4 range (e.g. 10.0.0.0/8)")
        if network in networks:
            raise ToaError(f"invalid trusted {shown}: {network} is given twice")
        networks.append(network)
    return ",".join(map(str, networks))


def autoload_files(
    target: Target, release: str, *, init: str = "systemd", options: dict[str, str] | None = None
) -> list[AutoloadFile]:
    """The files that load toa.ko for RELEASE at every boot of a TARGET host running INIT
    (toa.detect's value: systemd, sysv or other)."""
    validate_release(release)
    if init not in INITS:
        raise ToaError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
    arguments = module_options(options)
    style = target.autoload_for(init)
    if style == "coreos-unit":
        return [
            _render(COREOS_UNIT, "toa.service.j2", module_root=COREOS_MODULE_ROOT, options=arguments,
                    builds=builds_at_boot(target)),
            wants_link(COREOS_WANTS_LINK, COREOS_UNIT),
            *build_at_boot_files(target),
        ]
    files = {
        "modules-load.d": lambda: _render("/etc/modules-load.d/toa.conf", "modules-load.d.conf.j2"),
        "etc-modules": lambda: _render("/etc/modules", "etc-modules.lines.j2", kind="lines"),
        "sysconfig-modules": lambda: _render("/etc/sysconfig/modules/toa.modules", "sysconfig-modules.sh.j2",
                                             mode=0o755, module_subdir=MODULE_SUBDIR),
        "sysconfig-kernel": lambda: _render("/etc/sysconfig/kernel", "sysconfig-kernel.lines.j2", kind="lines"),
    }
    if style not in files:
        raise ToaError(f"target {target.id} has autoload style {target.autoload!r}, which toa cannot render: fix targets.toml")
    out = [files[style](), _render("/etc/modprobe.d/toa.conf", "modprobe.d.conf.j2", options=arguments)]
    out += kernel_hooks(target)
    if target.distro == "sles":
        unsupported = "unsupported-modules" if target.version == "11" else "10-unsupported-modules.conf"
        out.append(_render(f"/etc/modprobe.d/{unsupported}", "suse-unsupported-modules.conf.j2"))
    return out


def bpf_files(options: dict[str, str] | None = None) -> list[AutoloadFile]:
    """What makes a host attach the eBPF engine at every boot, as a deploy writes it: the unit (its
    loader BPF_LOADER, attached with OPTIONS, the module's option syntax) and its wants link."""
    return [
        bpf_unit(BPF_UNIT, BPF_LOADER, options, owned=True),
        wants_link(BPF_WANTS_LINK, BPF_UNIT),
    ]


def bpf_unit(path: str, loader: str, options: dict[str, str] | None = None, *, owned: bool = False) -> AutoloadFile:
    """toa-bpf.service at PATH running LOADER; OWNED: a file toa wrote (not a package's)."""
    return _render(path, "toa-bpf.service.j2", loader=loader, options=module_options(options), owned=owned)


def kernel_hooks(target: Target) -> list[AutoloadFile]:
    """The scripts the package manager runs when a kernel or its headers are installed, which give
    that kernel toa.ko (DKMS's, or built from hook_sources) or say loudly that it has none:
    Debian-likes run /etc/kernel/postinst.d (the kernel) and header_postinst.d (its headers, which
    may come later), RHEL 6/7 postinst.d, RHEL 8+ and Fedora kernel-install's plugins. None on SUSE,
    whose kernel packages run no such directory: there a new kernel's %post (weak-modules2
    --add-kernel) links in toa's KMPs of the same kABI (toa.package); none on CoreOS, which needs none."""
    values = {"source_dir": hook_source_dir(), "module_subdir": MODULE_SUBDIR}
    if target.family == "debian":
        return [_render(f"/etc/kernel/{hook}/zz-toa", "kernel-hook.sh.j2", mode=0o755, hook=hook, **values)
                for hook in ("postinst.d", "header_postinst.d")]
    if target.family == "rhel" and target.autoload == "sysconfig-modules":
        return [_render("/etc/kernel/postinst.d/zz-toa", "kernel-hook.sh.j2", mode=0o755, hook="postinst.d", **values)]
    if target.family == "rhel":
        return [_render("/etc/kernel/install.d/90-toa.install", "kernel-hook.sh.j2", mode=0o755, hook="install.d",
                        **values)]
    return []


def hook_source_dir(target: Target | None = None) -> str:
    """Where the kernel hooks find toa's module sources: versioned like DKMS's /usr/src/toa-<version>,
    and beside it rather than in it, so that a toa-dkms package and a deploy never own the same files.
    A CoreOS target's build at boot finds them in its writable module root (/usr is read-only there)."""
    if target is not None and builds_at_boot(target):
        return COREOS_SOURCE_DIR
    return f"/usr/src/toa-kmod-{toa.__version__}"


def builds_on_host(target: Target) -> bool:
    """Whether TARGET's hosts build toa.ko themselves (kernel hooks, or the build at boot), and so get
    the module sources (hook_sources)."""
    return bool(kernel_hooks(target)) or builds_at_boot(target)


def builds_at_boot(target: Target) -> bool:
    """Whether TARGET's hosts build toa.ko at boot, in a container, for a kernel that has none: Fedora
    CoreOS, whose build image (Fedora of the host's release) is on a public registry. Flatcar's
    developer container is not, so there the unit fails visibly until a deploy brings the build."""
    return target.autoload == "coreos-unit" and target.distro == "fedora-coreos"


def wants_link(link: str, unit: str) -> AutoloadFile:
    """LINK to UNIT, relative, as `systemctl enable` wires a unit in (so a deploy needs no systemctl)."""
    return AutoloadFile(link, posixpath.relpath(unit, posixpath.dirname(link)), 0o777, "symlink")


def build_at_boot_files(target: Target) -> list[AutoloadFile]:
    """The unit, its wants link and the scripts of the build at boot (see builds_at_boot)."""
    if not builds_at_boot(target):
        return []
    image = target.image.replace("{fedora}", "${VERSION_ID}")  # the host's own Fedora release
    values = {"module_root": COREOS_MODULE_ROOT, "source_dir": COREOS_SOURCE_DIR,
              "container_script": COREOS_CONTAINER_SCRIPT, "default_image": image}
    return [
        _render(COREOS_BUILD_UNIT, "toa-build.service.j2", script=COREOS_BUILD_SCRIPT, module_root=COREOS_MODULE_ROOT),
        wants_link(COREOS_BUILD_WANTS_LINK, COREOS_BUILD_UNIT),
        _render(COREOS_BUILD_SCRIPT, "build-at-boot.sh.j2", mode=0o755, **values),
        _render(COREOS_CONTAINER_SCRIPT, "build-in-container.sh.j2", mode=0o644),
    ]


def module_source_files(source: Path = MODULE_SOURCE) -> list[Path]:
    """The module's sources (relative to SOURCE), without what a build in that folder leaves behind."""
    return sorted(path.relative_to(source) for path in source.rglob("*")
                  if path.is_file() and not any(path.match(pattern) for pattern in BUILD_OUTPUTS)
                  and not any(part.startswith(".") for part in path.relative_to(source).parts))


@functools.lru_cache(maxsize=4)
def _module_sources(source: Path) -> tuple[tuple[str, str], ...]:
    """(relative path, text) of each of SOURCE's module sources, read once per process: a deploy asks
    for them several times per host, and walking and reading the tree was over half of its CPU in a profile."""
    return tuple((relative.as_posix(), (source / relative).read_text()) for relative in module_source_files(source))


def hook_sources(target: Target) -> list[AutoloadFile]:
    """toa's module sources in hook_source_dir(TARGET), for hosts whose kernel hooks, or build at boot,
    build toa.ko: deploy and toa-common install them beside the hooks."""
    if not builds_on_host(target):
        return []
    return [AutoloadFile(f"{hook_source_dir(target)}/{relative}", text, 0o644)
            for relative, text in _module_sources(MODULE_SOURCE)]


def _render(path: str, template: str, *, mode: int = 0o644, kind: str = "file", **values) -> AutoloadFile:
    if not (TEMPLATES_DIR / template).is_file():
        raise ToaError(f"template {template} not found in {TEMPLATES_DIR}: reinstall toa")
    return AutoloadFile(path, render_template(TEMPLATES_DIR, template, **values), mode, kind)


def write_tree(files: list[AutoloadFile], out_dir: Path) -> list[Path]:
    """Write FILES under OUT_DIR as they would land on the host (OUT_DIR/etc/...), with their modes.

    A "lines" entry is written as <path>.toa-lines holding toa's block alone, so that copying the
    tree onto a host can never replace its shared /etc/modules or /etc/sysconfig/kernel. Every
    destination is checked before anything is written, and no path below OUT_DIR may pass through
    a symlink: a tree planted with `etc -> /etc` must not make toa write the real /etc.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ToaError(f"{out_dir} exists and is not a directory: give --out a new or existing directory")
    placed = [(entry, _destination(out_dir, entry)) for entry in files]
    written = []
    try:
        for entry, destination in placed:
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.is_symlink() or destination.exists():
                destination.unlink()
            if entry.kind == "symlink":
                os.symlink(entry.content, destination)
            else:
                # O_NOFOLLOW|O_EXCL: nothing may have appeared at the name since it was checked
                fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, entry.mode)
                with os.fdopen(fd, "w") as out:
                    out.write(entry.content)
                destination.chmod(entry.mode)
            written.append(destination)
    except OSError as exc:
        raise ToaError(f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}; "
                       f"{len(written)} of {len(placed)} files were written under {out_dir}") from None
    return written


def _destination(out_dir: Path, entry: AutoloadFile) -> Path:
    """Where ENTRY goes under OUT_DIR, after checking every component of the way there."""
    relative = Path(entry.path.lstrip("/") + (".toa-lines" if entry.kind == "lines" else ""))
    if not entry.path.startswith("/") or ".." in relative.parts:
        raise ToaError(f"refusing to write {entry.path!r}: not an absolute path on the host")
    here = out_dir
    for part in relative.parts[:-1]:
        here = here / part
        if here.is_symlink():
            raise ToaError(f"{here} is a symlink: toa writes no file through one; give --out a fresh directory")
        if here.exists() and not here.is_dir():
            raise ToaError(f"{here} is not a directory: remove it or choose another --out")
    destination = out_dir / relative
    if destination.is_symlink() and entry.kind != "symlink":
        raise ToaError(f"{destination} is a symlink: toa writes no file through one; give --out a fresh directory")
    if destination.is_dir() and not destination.is_symlink():
        raise ToaError(f"{destination} is a directory: remove it or choose another --out")
    return destination
