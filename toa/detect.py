"""Which distro and kernel a machine runs: a local host, a root directory, or a host over SSH.

Reading (a connector: local files, files under a root, one command over SSH) is kept apart from
understanding (`identify`, a pure function of the text read), so one parser serves all three and is
tested offline on real distros' release files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from toa import kernel as kernels
from toa import targets
from toa.errors import ToaError
from toa.targets import Target

RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release", "/etc/redhat-release", "/etc/SuSE-release")
SYSTEMD_BINARIES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")


@dataclass
class Facts:
    """What was read from a machine, before any interpretation."""

    files: dict[str, str] = field(default_factory=dict)
    kernel: str | None = None
    systemd: bool = False
    pid1: str | None = None  # the running init's name, where one runs (not for a root directory)
    installed: list[str] = field(default_factory=list)  # kernels with modules installed, as read
    default_kernel: str | None = None  # what the boot loader names as its default (grubby), as read


@dataclass(frozen=True)
class Platform:
    family: str | None
    distro: str
    version: str
    name: str
    init: str
    kernel: str | None
    target: Target | None
    support: str = ""  # how toa serves this host, where its distro has no target of its own
    installed_kernels: tuple[str, ...] = ()  # oldest first
    next_kernel: str | None = None  # the kernel the next boot runs, where that can be told
    next_kernel_from: str = ""  # how it was told

    @property
    def headers(self) -> tuple[str | None, str | None]:
        if self.target is None or self.kernel is None:
            return None, None
        return self.target.headers_for(self.kernel)

    def _autoload(self) -> str | None:
        """The style `invoke render` and deploy write for this host (its target and init), or None."""
        try:
            return self.target.autoload_for(self.init) if self.target else None
        except ToaError:
            return None

    def as_dict(self) -> dict:
        package, path = self.headers
        known = kernels.classify(self.kernel) if self.kernel else None
        return {
            "family": self.family,
            "distro": self.distro,
            "version": self.version,
            "name": self.name,
            "init": self.init,
            "kernel": self.kernel,
            "kernel_targets": [t.id for t in known.targets] if known else [],
            "target": self.target.id if self.target else None,
            "build": self.target.build if self.target else None,
            "autoload": self._autoload(),
            "headers_package": package,
            "headers_path": path,
            "support": self.support or ("supported" if self.target else "unsupported"),
            "installed_kernels": list(self.installed_kernels),
            "next_kernel": self.next_kernel,
            "next_kernel_from": self.next_kernel_from,
        }


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of an os-release file, with shell-style quoting undone (never executed)."""
    values = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            continue
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        values[key] = " ".join(words)
    return values


def _family(distro: str, like: list[str]) -> str | None:
    names = {distro, *like}
    if names & {"coreos", "flatcar", "fedora-coreos"}:
        return "coreos"
    if names & {"rhel", "centos", "fedora"}:
        return "rhel"
    if names & {"suse", "sles", "opensuse"} or distro.startswith(("sles", "opensuse")):
        return "suse"
    if names & {"debian", "ubuntu"}:
        return "debian"
    return None


def _from_os_release(values: dict[str, str]) -> tuple[str, str, str, list[str]]:
    distro = values.get("ID", "linux").lower()
    like = values.get("ID_LIKE", "").lower().split()
    if distro == "fedora" and values.get("VARIANT_ID") == "coreos":
        distro = "fedora-coreos"
    version = values.get("VERSION_ID", "")
    if distro == "debian" and not version:
        version = "sid"  # unstable and testing carry no VERSION_ID
    name = values.get("PRETTY_NAME") or values.get("NAME") or distro
    return distro, version, name, like


def _from_redhat_release(text: str) -> tuple[str, str, str, list[str]] | None:
    match = re.match(r"(?P<name>.+?) release (?P<version>[\d.]+)", text.strip())
    if not match:
        return None
    distro = "centos" if "centos" in match["name"].lower() else "rhel"
    return distro, match["version"], text.strip().splitlines()[0], ["rhel"]


def _from_suse_release(text: str) -> tuple[str, str, str, list[str]] | None:
    fields = dict(re.findall(r"^(\w+)\s*=\s*(\S+)", text, re.M))
    if "VERSION" not in fields:
        return None
    version = fields["VERSION"] + (f".{fields['PATCHLEVEL']}" if fields.get("PATCHLEVEL", "0") != "0" else "")
    distro = "sles" if "enterprise" in text.lower() else "opensuse"
    return distro, version, text.strip().splitlines()[0], ["suse"]


def identify(facts: Facts) -> Platform:
    """Interpret facts read from a machine. Pure: no I/O."""
    found = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if facts.files.get(path, "").strip():
            found = _from_os_release(parse_os_release(facts.files[path]))
            break
    if found is None and "/etc/redhat-release" in facts.files:
        found = _from_redhat_release(facts.files["/etc/redhat-release"])
    if found is None and "/etc/SuSE-release" in facts.files:
        found = _from_suse_release(facts.files["/etc/SuSE-release"])
    if found is None:
        raise ToaError(
            "no /etc/os-release, /usr/lib/os-release, /etc/redhat-release or /etc/SuSE-release found: "
            "is this a Linux root? point --root at the directory that holds etc/"
        )
    distro, version, name, like = found
    family = _family(distro, like)
    target, support = _target(distro, version, name, family, facts.kernel)
    return Platform(
        family=family,
        distro=distro,
        version=version,
        name=name,
        init=_init(facts),
        kernel=facts.kernel,
        target=target,
        support=support,
        **_next_boot(facts, family),
    )


def _is_release(text: str) -> bool:
    try:
        kernels.validate_release(text)
    except ToaError:
        return False  # a stray directory under /lib/modules, or garbage from a host: not a kernel
    return True


def _next_boot(facts: Facts, family: str | None) -> dict:
    """The installed kernels and the one the next boot runs: the boot loader's default where it
    names one (grubby on RHEL-likes), else the newest installed, which GRUB's default entry is on
    Debian, Ubuntu and SUSE. CoreOS/Flatcar swap the whole OS image: not told here."""
    installed = sorted({k for k in facts.installed if _is_release(k)}, key=kernels.version_key)
    found = {"installed_kernels": tuple(installed)}
    if family == "coreos":
        return found
    if facts.default_kernel and _is_release(facts.default_kernel):
        return {**found, "next_kernel": facts.default_kernel, "next_kernel_from": "boot loader default (grubby)"}
    if installed:
        return {**found, "next_kernel": installed[-1], "next_kernel_from": "newest installed (GRUB's default entry)"}
    return found


def _target(distro: str, version: str, name: str, family: str | None, kernel: str | None) -> tuple[Target | None, str]:
    """The host's build target and, where its distro has none of its own, how toa serves it: a RHEL
    rebuild (Oracle Linux, Amazon Linux, Anolis, ...) running a RHEL kernel is built as that RHEL
    release; anything else is named unsupported in one line."""
    own = targets.for_os(distro, version)
    if own is not None:
        return own, ""
    known = kernels.classify(kernel) if kernel else None
    if family == "rhel" and known is not None and known.family == "rhel":
        nearest = next((t for t in known.default_targets if t.distro == "rhel"), known.default_targets[0])
        return nearest, f"as {nearest.id}: {name} has no target of its own, and {kernel} is a RHEL kernel"
    running = f"kernel {kernel}" if kernel else "its kernel"
    return None, (f"unsupported: toa has no target for {name} ({distro} {version or '-'}) and {running} is no "
                  "kernel of a supported distro; build against its headers with --local --headers DIR")


def _init(facts: Facts) -> str:
    """systemd, sysv (a classic /sbin/init), or other (a container's or sandbox's own PID 1)."""
    if facts.systemd:
        return "systemd"
    return "sysv" if facts.pid1 in (None, "init") else "other"


# --- connectors: how facts are read -------------------------------------------------------------


def read_local() -> Facts:
    """This machine: its files, its running kernel, and whether systemd is PID 1."""
    facts = _read_root(Path("/"))
    facts.kernel = os.uname().release
    facts.installed = _installed_kernels(Path("/"))
    grubby = shutil.which("grubby")
    if grubby:
        result = subprocess.run([grubby, "--default-kernel"], capture_output=True, text=True, check=False)
        facts.default_kernel = _vmlinuz_release(result.stdout.strip())
    facts.systemd = Path("/run/systemd/system").is_dir()
    try:
        facts.pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:  # /proc hidden from this process
        pass
    return facts


def _inside(root: Path, path: str) -> Path:
    """PATH under ROOT, resolved component by component as the root's own system would see it:
    an absolute symlink starts again at ROOT and `..` stops at ROOT, so no link (etc -> /etc,
    lib -> ../../..) leads out of the root to this machine's files."""
    pending = list(PurePosixPath("/", path).parts[1:])
    resolved: list[str] = []  # components below ROOT, none of them a symlink
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if not candidate.is_symlink():
            resolved.append(part)
            continue
        hops += 1
        if hops > 40:
            raise ToaError(f"too many symlinks under {root} resolving {path}: check the root filesystem")
        target = PurePosixPath(os.readlink(candidate))
        if target.is_absolute():
            resolved = []
        pending = [p for p in target.parts if p != "/"] + pending
    return root.joinpath(*resolved)


def _read_root(root: Path) -> Facts:
    facts = Facts()
    for path in RELEASE_FILES:
        candidate = _inside(root, path)
        if candidate.is_file():
            facts.files[path] = candidate.read_text(errors="replace")
    return facts


def read_root(root: str | Path) -> Facts:
    """An image rootfs or mounted disk: its release files, its newest installed kernel, and
    whether it boots systemd."""
    root = Path(root)
    if not root.is_dir():
        raise ToaError(f"--root {root}: not a directory; give the path of a mounted root filesystem")
    facts = _read_root(root)
    releases = []
    for modules in ("/lib/modules", "/usr/lib/modules"):
        folder = _inside(root, modules)
        if folder.is_dir():
            releases += [p.name for p in folder.iterdir() if p.is_dir()]
    if releases:
        facts.kernel = max(releases, key=kernels.version_key)
    facts.installed = _installed_kernels(root)
    facts.systemd = any(_inside(root, p).exists() for p in SYSTEMD_BINARIES)
    return facts


# A kernel is installed when its modules are indexed or its image is there, not for a headers tree alone.
KERNEL_MARKERS = ("modules.dep", "modules.order", "vmlinuz")


def _installed_kernels(root: Path) -> list[str]:
    found = set()
    for modules in ("/lib/modules", "/usr/lib/modules"):
        folder = _inside(root, modules)
        if not folder.is_dir():
            continue
        for release in folder.iterdir():
            if any((release / marker).exists() for marker in KERNEL_MARKERS) or \
                    _inside(root, f"/boot/vmlinuz-{release.name}").exists():
                found.add(release.name)
    return sorted(found)


def _vmlinuz_release(path: str) -> str | None:
    """The release in a boot loader's /boot/vmlinuz-<release>."""
    name = PurePosixPath(path).name
    return name[len("vmlinuz-"):] if name.startswith("vmlinuz-") else None


# One round trip: the release files, the running kernel, PID 1, whether systemd is running, the
# installed kernels and the boot loader's default where grubby names it.
# The shell's own read where it does (a process costs tens of milliseconds on a slow host); $k keeps
# the release for a command that follows this one (deploy's facts).
REMOTE_FACTS_COMMAND = (
    "for f in " + " ".join(RELEASE_FILES) + "; do "
    # identify reads /usr/lib/os-release only where /etc/os-release says nothing (a dash loop per line is slow)
    'if [ "$f" = /usr/lib/os-release ] && [ -s /etc/os-release ]; then continue; fi; '
    '[ -r "$f" ] && { echo "@@toa-file $f"; while IFS= read -r l || [ -n "$l" ]; do printf "%s\\n" "$l"; done < "$f"; '
    "echo; }; done; "
    'k=$(uname -r); echo "@@toa-kernel $k"; '
    'c=; read -r c < /proc/1/comm 2>/dev/null; echo "@@toa-pid1 $c"; '
    '[ -d /run/systemd/system ] && echo "@@toa-systemd"; '
    "for d in /lib/modules/* /usr/lib/modules/*; do r=${d##*/}; "
    '{ [ -e "$d/modules.dep" ] || [ -e "$d/modules.order" ] || [ -e "$d/vmlinuz" ] || [ -e "/boot/vmlinuz-$r" ]; } '
    '&& echo "@@toa-installed $r"; done; '
    'command -v grubby >/dev/null 2>&1 && echo "@@toa-default $(grubby --default-kernel 2>/dev/null)"; true'
)


def parse_remote_facts(output: str) -> Facts:
    """Parse REMOTE_FACTS_COMMAND's output. Pure."""
    facts = Facts()
    current = None
    for line in output.splitlines():
        if line.startswith("@@toa-file "):
            current = line.split(" ", 1)[1]
            facts.files[current] = ""
        elif line.startswith("@@toa-kernel "):
            facts.kernel = line.split(" ", 1)[1].strip() or None
            current = None
        elif line.startswith("@@toa-pid1 "):
            facts.pid1 = line.split(" ", 1)[1].strip() or None
            current = None
        elif line == "@@toa-systemd":
            facts.systemd = True
        elif line.startswith("@@toa-installed "):
            facts.installed.append(line.split(" ", 1)[1].strip())
            current = None
        elif line.startswith("@@toa-default "):
            facts.default_kernel = _vmlinuz_release(line.split(" ", 1)[1].strip())
            current = None
        elif current is not None:
            facts.files[current] += line + "\n"
    if facts.kernel:
        kernels.validate_release(facts.kernel)
    return facts


def read_remote(conn) -> Facts:
    """A host over SSH (a fabric Connection)."""
    from toa.remote import run

    return parse_remote_facts(run(conn, REMOTE_FACTS_COMMAND))
