"""Debian kernels from the mirror apt is configured with: resolve, download and unpack them.

Package lookups use a private apt configuration under the cache dir, one per suite, so the
system's own sources and state are never touched. The resolution itself (which release is the
newest, which packages belong to it) is pure parsing of the suites' package indexes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toa.errors import ToaError
from toa.kernel import validate_release

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES_FILE = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
# A suite's package index younger than this is used without asking the mirror again.
INDEX_MAX_AGE_SECONDS = 6 * 3600


@dataclass(frozen=True)
class Pocket:
    """One suite of the archive whose package index is read, e.g. bookworm-security."""

    name: str
    archive: str  # "debian" (the main mirror) or "security" (the security mirror)
    optional: bool = False  # read when apt here knows the mirror for it, skipped otherwise


@dataclass(frozen=True)
class Suite:
    """A kernel line users ask for by name, the pockets it comes from and the container that builds it."""

    name: str
    pockets: tuple
    container: str  # the Debian suite whose compiler and glibc the headers' tools expect
    default_series_only: bool = False  # keep to the base suite's kernel series (6.1 on bookworm)
    apt_extra: tuple = ()  # suites apt is also given, e.g. the base suite of a backports suite
    expiring_release: bool = True  # sid/forky Release files count as expired on mirrors


def _stable(name: str) -> Suite:
    """A stable release: its own pocket plus its security updates, in its default kernel series."""
    pockets = (Pocket(name, "debian"), Pocket(f"{name}-security", "security", optional=True))
    return Suite(name, pockets, container=name, default_series_only=True)


SUITES = {
    suite.name: suite
    for suite in (
        _stable("bullseye"),
        _stable("bookworm"),
        # bookworm-security also carries newer kernel series (6.12) for bookworm.
        Suite("bookworm-security", (Pocket("bookworm-security", "security"),), container="bookworm"),
        _stable("trixie"),
        Suite("trixie-backports", (Pocket("trixie-backports", "debian"),), container="trixie",
              apt_extra=("trixie",)),
        Suite("forky", (Pocket("forky", "debian"),), container="forky", expiring_release=False),
        Suite("sid", (Pocket("sid", "debian"),), container="sid", expiring_release=False),
    )
}

# Strict shapes for anything that reaches a command line or a path.
SUITE_RE = re.compile(r"[a-z][a-z0-9-]{1,40}")
DEBIAN_RELEASE_RE = re.compile(r"[0-9]+\.[0-9]+[0-9A-Za-z.+~_-]*-amd64")
PACKAGE_RE = re.compile(r"linux-[a-z0-9][a-z0-9.+~-]{1,100}")
DEB_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.+-]{1,100}")  # any Debian package name
VERSION_RE = re.compile(r"[0-9][0-9A-Za-z.+~:-]{0,100}")
MIRROR_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~/-]*)?")


@dataclass(frozen=True)
class KernelPackages:
    """The packages of one Debian kernel release (all built from one kernel upload: one version)."""

    suite: str
    release: str
    version: str
    image_pkg: str  # holds the vmlinuz: linux-image-<release> or, in the split layout, linux-binary-<release>
    modules_pkg: str | None  # the split layout's linux-modules-<release>; None when the image holds them
    headers_pkgs: tuple  # linux-headers-<release>, its -common package and linux-kbuild

    @property
    def all_pkgs(self) -> tuple:
        return (self.image_pkg,) + ((self.modules_pkg,) if self.modules_pkg else ()) + self.headers_pkgs


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel in the cache."""

    release: str
    suite: str
    vmlinuz: Path
    modules_dir: Path | None
    headers_dir: Path


@dataclass(frozen=True)
class SourceEntry:
    """One (uri, suite) pair of a `deb` line or deb822 stanza of the system's apt sources."""

    uri: str
    suite: str


# ---------------------------------------------------------------- input validation


def suites() -> list[str]:
    return list(SUITES)


def check_suite(suite: str) -> Suite:
    if not isinstance(suite, str) or not SUITE_RE.fullmatch(suite) or suite not in SUITES:
        raise ToaError(f"unknown Debian suite {suite!r}: use one of {', '.join(SUITES)}")
    return SUITES[suite]


def is_debian_release(release: str) -> bool:
    return bool(DEBIAN_RELEASE_RE.fullmatch(validate_release(release)))


# ---------------------------------------------------------------- the system's apt sources


def parse_one_line_sources(text: str) -> list[SourceEntry]:
    """Parse the one-line format: `deb [options] URI SUITE COMPONENT...`."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line[4:])
        fields = line.split()
        if len(fields) >= 2:
            entries.append(SourceEntry(fields[0].rstrip("/"), fields[1]))
    return entries


def parse_deb822_sources(text: str) -> list[SourceEntry]:
    """Parse the deb822 format: stanzas with Types, URIs, Suites (continuation lines allowed)."""
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append(SourceEntry(uri.rstrip("/"), suite))
    return entries


def system_sources(
    sources_file: Path = APT_SOURCES_FILE, sources_dir: Path = APT_SOURCES_DIR
) -> list[SourceEntry]:
    """Every (uri, suite) apt reads: sources.list plus sources.list.d/*.list and *.sources."""
    entries = []
    if sources_file.is_file():
        entries += parse_one_line_sources(sources_file.read_text(errors="replace"))
    if sources_dir.is_dir():
        for path in sorted(sources_dir.iterdir()):
            if path.suffix == ".list":
                entries += parse_one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                entries += parse_deb822_sources(path.read_text(errors="replace"))
    return entries


DEBIAN_CODENAMES = ("buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable")


def find_mirrors(entries: list[SourceEntry]) -> dict[str, str]:
    """The Debian main and security mirror URLs among apt's sources: {"debian": url, "security": url}."""
    mirrors: dict[str, str] = {}
    for entry in entries:
        codename, _, pocket = entry.suite.partition("-")
        if codename not in DEBIAN_CODENAMES or not MIRROR_RE.fullmatch(entry.uri):
            continue
        archive = "security" if pocket == "security" else "debian"
        mirrors.setdefault(archive, entry.uri)
    return mirrors


MIRROR_ENV = {"debian": "TOA_DEBIAN_MIRROR", "security": "TOA_DEBIAN_SECURITY_MIRROR"}


def mirror_for(archive: str) -> str | None:
    """The Debian archive's ("debian") or security archive's ("security") URL: $TOA_DEBIAN_MIRROR /
    $TOA_DEBIAN_SECURITY_MIRROR when set (hosts whose apt sources name no Debian mirror, e.g. an
    Ubuntu CI runner), else the one apt here uses."""
    override = os.environ.get(MIRROR_ENV[archive])
    if override:
        if not MIRROR_RE.fullmatch(override):
            raise ToaError(f"${MIRROR_ENV[archive]}={override!r} is not a mirror URL like http://deb.debian.org/debian")
        return override
    return find_mirrors(system_sources()).get(archive)


def _require_mirror(pocket: Pocket) -> str:
    mirror = mirror_for(pocket.archive)
    if mirror is None:
        what = "Debian security mirror (a *-security suite)" if pocket.archive == "security" else "Debian mirror"
        raise ToaError(f"no {what} in {APT_SOURCES_FILE} or {APT_SOURCES_DIR}/: add one to apt's sources "
                       f"or set ${MIRROR_ENV[pocket.archive]}")
    return mirror


# ---------------------------------------------------------------- Debian version order


def _char_order(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(left: str, right: str) -> int:
    """dpkg's comparison of an upstream version or revision: alternating non-digit and digit runs."""
    while left or right:
        left_text = re.match(r"[^0-9]*", left).group()
        right_text = re.match(r"[^0-9]*", right).group()
        for i in range(max(len(left_text), len(right_text))):
            a = _char_order(left_text[i]) if i < len(left_text) else 0
            b = _char_order(right_text[i]) if i < len(right_text) else 0
            if a != b:
                return -1 if a < b else 1
        left, right = left[len(left_text):], right[len(right_text):]
        left_num = re.match(r"[0-9]*", left).group()
        right_num = re.match(r"[0-9]*", right).group()
        if int(left_num or 0) != int(right_num or 0):
            return -1 if int(left_num or 0) < int(right_num or 0) else 1
        left, right = left[len(left_num):], right[len(right_num):]
    return 0


def compare_versions(left: str, right: str) -> int:
    """Compare two Debian package versions the way dpkg does: -1, 0 or 1."""

    def split(version):
        epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    left_epoch, left_upstream, left_revision = split(left)
    right_epoch, right_upstream, right_revision = split(right)
    if left_epoch != right_epoch:
        return -1 if left_epoch < right_epoch else 1
    return _compare_part(left_upstream, right_upstream) or _compare_part(left_revision, right_revision)


# ---------------------------------------------------------------- package index parsing


def parse_packages_index(text: str) -> dict[str, dict[str, str]]:
    """A Packages file as {package: fields} (newest version wins when a name appears twice)."""
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        name, version = fields.get("Package"), fields.get("Version")
        if not name or not version:
            continue
        if name not in packages or compare_versions(version, packages[name]["Version"]) > 0:
            packages[name] = fields
    return packages


def _depends_names(fields: dict[str, str]) -> list[str]:
    names = []
    for alternative in re.split(r"[,|]", fields.get("Depends", "")):
        name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
        if name:
            names.append(name)
    return names


def kernels_in_index(suite: str, packages: dict[str, dict[str, str]]) -> list[KernelPackages]:
    """Every complete amd64 kernel (image, headers, -common, kbuild) in one Packages index."""
    kernels = []
    for name, fields in packages.items():
        match = re.fullmatch(r"linux-image-(.+-amd64)", name)
        if not match or not DEBIAN_RELEASE_RE.fullmatch(match.group(1)):
            continue
        release, version = match.group(1), fields["Version"]
        image_depends = _depends_names(fields)
        binary_pkg, modules_pkg = f"linux-binary-{release}", f"linux-modules-{release}"
        if binary_pkg in image_depends:
            image_pkg, modules = binary_pkg, modules_pkg  # the split layout of 6.16+ kernels
        else:
            image_pkg, modules = name, None
        headers_pkg = f"linux-headers-{release}"
        if headers_pkg not in packages:
            continue
        headers_depends = _depends_names(packages[headers_pkg])
        common = [dep for dep in headers_depends if re.fullmatch(r"linux-headers-.+-common", dep)]
        kbuild = [dep for dep in headers_depends if dep.startswith("linux-kbuild-")]
        wanted = [image_pkg] + ([modules] if modules else []) + [headers_pkg] + common[:1] + kbuild[:1]
        if len(common) < 1 or len(kbuild) < 1:
            continue
        if not all(
            pkg in packages and packages[pkg]["Version"] == version and PACKAGE_RE.fullmatch(pkg)
            for pkg in wanted
        ):
            continue
        kernels.append(
            KernelPackages(
                suite=suite,
                release=release,
                version=version,
                image_pkg=image_pkg,
                modules_pkg=modules,
                headers_pkgs=(headers_pkg, common[0], kbuild[0]),
            )
        )
    return kernels


# ---------------------------------------------------------------- the private apt configuration


def cache_dir() -> Path:
    """$TOA_CACHE_DIR, else $XDG_CACHE_HOME/toa, else ~/.cache/toa."""
    if os.environ.get("TOA_CACHE_DIR"):
        return Path(os.environ["TOA_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "toa"
    return Path.home() / ".cache" / "toa"


def _apt_root(suite: Suite) -> Path:
    return cache_dir() / "apt" / suite.name


def apt_options(suite_name: str) -> list[str]:
    """apt-get/apt-cache `-o` options that point apt at the suite's private configuration."""
    suite = check_suite(suite_name)
    root = _apt_root(suite)
    options = {
        "Dir::Etc::SourceList": root / "sources.list",
        "Dir::Etc::SourceParts": root / "sources.list.d",
        "Dir::Etc::Preferences": root / "preferences",
        "Dir::Etc::PreferencesParts": root / "preferences.d",
        "Dir::State::Lists": root / "lists",
        "Dir::State::status": root / "status",
        "Dir::Cache": root / "cache",
        "APT::Architecture": "amd64",
        "APT::Architectures": "amd64",
        # Downloads land in the invoking user's cache, which apt's _apt sandbox user cannot write;
        # the indexes are still checked against the Debian archive keyring (signed-by).
        "APT::Sandbox::User": "root",
        "Acquire::Languages": "none",
    }
    if not suite.expiring_release:
        options["Acquire::Check-Valid-Until"] = "false"
    argv = []
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def _apt_pockets(suite: Suite) -> list[tuple[Pocket, str]]:
    """(pocket, mirror) for every suite apt is given: the suite's pockets plus any extra (base) suites."""
    pockets = list(suite.pockets) + [Pocket(name, "debian") for name in suite.apt_extra]
    chosen = []
    for pocket in pockets:
        if pocket.optional and mirror_for(pocket.archive) is None:
            continue
        chosen.append((pocket, _require_mirror(pocket)))
    return chosen


def _write_apt_root(suite: Suite) -> None:
    root = _apt_root(suite)
    for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    lines = [f"deb [signed-by={KEYRING}] {mirror} {pocket.name} main\n" for pocket, mirror in _apt_pockets(suite)]
    (root / "sources.list").write_text("".join(lines))


_PROVIDERS = {"apt-get": "apt", "dpkg-deb": "dpkg", "/usr/lib/apt/apt-helper": "apt", "debootstrap": "debootstrap"}
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToaError(f"{argv[0]} not found: install it (apt-get install {_PROVIDERS[argv[0]]})") from None
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ToaError(f"{what} failed: {tail}")
    return result.stdout


def debootstrap(suite: str, root: Path, *, include: tuple[str, ...] = (), what: str = "",
                progress: Callable[[str], None] | None = None) -> None:
    """A minimal SUITE root at ROOT from apt's Debian mirror, every download checked against the
    Debian archive keyring: an unsigned or tampered Release file stops it."""
    check_suite(suite)
    mirror = mirror_for("debian")
    if mirror is None:
        raise ToaError("no Debian mirror in apt's sources to debootstrap from: add one to /etc/apt/sources.list.d/")
    if not KEYRING.is_file():
        raise ToaError(f"{KEYRING} missing: apt-get install debian-archive-keyring")
    # Suites newer than this debootstrap (forky) bootstrap like sid.
    script = DEBOOTSTRAP_SCRIPTS / suite
    if not script.exists():
        script = DEBOOTSTRAP_SCRIPTS / "sid"
    if progress:
        progress(f"debootstrap {what or suite} from {mirror}")
    include_flag = [f"--include={','.join(include)}"] if include else []
    _run(["debootstrap", "--variant=minbase", f"--keyring={KEYRING}", "--force-check-gpg", *include_flag,
          suite, str(root), mirror, str(script)], f"debootstrap of {what or suite}")


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock, so that concurrent toa runs take turns on one cache entry."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _update_index(suite: Suite) -> None:
    """Refresh the suite's package indexes from the mirror unless they are recent."""
    stamp = _apt_root(suite) / "updated"
    with _exclusive(_apt_root(suite).with_name(f"{suite.name}.lock")):
        if stamp.exists() and time.time() - stamp.stat().st_mtime < INDEX_MAX_AGE_SECONDS:
            return
        if not KEYRING.is_file():
            raise ToaError(f"{KEYRING} missing: apt-get install debian-archive-keyring")
        _write_apt_root(suite)
        _run(["apt-get", *apt_options(suite.name), "update"], f"apt-get update for {suite.name}")
        stamp.touch()


def _kernel_stanzas(text: str) -> str:
    """Only the linux-* stanzas of a Packages file: the rest is large and irrelevant here."""
    return "\n\n".join(stanza for stanza in text.split("\n\n") if stanza.startswith("Package: linux-"))


def _pocket_indexes(suite: Suite) -> dict[str, dict[str, dict[str, str]]]:
    """{pocket name: parsed Packages index} for the suite's pockets (not its extra apt suites)."""
    listing = _run(
        ["apt-get", *apt_options(suite.name), "indextargets", "--format", "$(RELEASE) $(FILENAME)",
         "Identifier: Packages"],
        f"apt-get indextargets for {suite.name}",
    )
    files = dict(line.split(" ", 1) for line in listing.splitlines() if " " in line)
    indexes = {}
    for pocket, mirror in _apt_pockets(suite):
        if pocket not in suite.pockets:
            continue
        filename = files.get(pocket.name)
        if not filename or not Path(filename).is_file():
            raise ToaError(f"no package index for {pocket.name} from {mirror}: check the mirror carries it")
        text = _run(["/usr/lib/apt/apt-helper", "cat-file", filename], f"reading {filename}")
        indexes[pocket.name] = parse_packages_index(_kernel_stanzas(text))
    return indexes


def default_series(packages: dict[str, dict[str, str]]) -> str | None:
    """The kernel series (e.g. "6.1") the index's linux-image-amd64 metapackage installs."""
    meta = packages.get("linux-image-amd64")
    match = re.match(r"([0-9]+\.[0-9]+)\.", meta["Version"]) if meta else None
    return match.group(1) if match else None


def kernels_of_suite(suite_name: str) -> list[KernelPackages]:
    """Every complete kernel (all flavours) a suite offers, oldest first."""
    suite = check_suite(suite_name)
    _update_index(suite)
    indexes = _pocket_indexes(suite)
    kernels = []
    for packages in indexes.values():
        kernels += kernels_in_index(suite.name, packages)
    if suite.default_series_only:
        series = default_series(indexes[suite.pockets[0].name])
        kernels = [k for k in kernels if series and k.version.startswith(series + ".")]
    kernels.sort(key=functools.cmp_to_key(lambda a, b: compare_versions(a.version, b.version)))
    return kernels


def is_generic_flavour(release: str) -> bool:
    """True for the plain -amd64 flavour, false for -cloud-amd64, -rt-amd64 and the like."""
    return bool(re.fullmatch(r".*[0-9]-amd64", release))


def resolve_suite(suite_name: str) -> KernelPackages:
    """The newest generic amd64 kernel of a suite, from its package indexes."""
    kernels = [k for k in kernels_of_suite(suite_name) if is_generic_flavour(k.release)]
    if not kernels:
        raise ToaError(f"no amd64 kernel with headers in {suite_name}'s package index: pick another suite")
    return kernels[-1]


def find_release(release: str) -> KernelPackages:
    """A full Debian release (`uname -r`, e.g. 6.1.0-56-amd64) searched across the suites."""
    validate_release(release)
    if not is_debian_release(release):
        raise ToaError(f"{release} is not a Debian amd64 kernel release (like 6.1.0-56-amd64)")
    available, listed = {}, set()
    for name in SUITES:
        try:
            kernels = kernels_of_suite(name)
        except ToaError as exc:
            available[name] = f"unavailable ({exc})"
            continue
        for kernel in kernels:
            if kernel.release == release:
                return kernel
        # each release once: under the first suite that has it (bookworm-security repeats bookworm's)
        generic = [r for r in dict.fromkeys(k.release for k in reversed(kernels) if is_generic_flavour(k.release))
                   if r not in listed]
        listed.update(generic)
        available[name] = ", ".join(generic) or "none"
    listing = "; ".join(f"{suite}: {releases}" for suite, releases in available.items())
    raise ToaError(f"kernel {release} is in no suite's index (Debian drops a kernel's packages when a newer ABI "
                   "replaces it): build against its headers with --local --headers DIR (its linux-headers, -common "
                   "and linux-kbuild .debs, e.g. from snapshot.debian.org, unpacked with dpkg-deb -x), or pick a "
                   f"kernel the mirror has (newest first): {listing}")


# ---------------------------------------------------------------- download and unpack


def kernel_dir(release: str) -> Path:
    return cache_dir() / "kernels" / validate_release(release)


def _tree(pkgs: KernelPackages, root: Path) -> KernelTree:
    release = pkgs.release
    vmlinuz_candidates = [root / "boot" / f"vmlinuz-{release}", root / "usr/lib/modules" / release / "vmlinuz"]
    modules_candidates = [root / "lib/modules" / release, root / "usr/lib/modules" / release]
    vmlinuz = next((p for p in vmlinuz_candidates if p.is_file()), None)
    if vmlinuz is None:
        raise ToaError(f"{pkgs.image_pkg} holds no vmlinuz for {release}: remove {root.parent} and retry")
    modules_dir = next((p for p in modules_candidates if (p / "kernel").is_dir()), None)
    return KernelTree(release, pkgs.suite, vmlinuz, modules_dir, root / "usr/src" / f"linux-headers-{release}")


def _point_makefile_into_tree(headers_dir: Path, root: Path) -> None:
    """The headers' Makefile names the -common tree (and, on 6.16+, KBUILD_OUTPUT) by absolute
    /usr/src paths; make them the cached ones."""
    makefile = headers_dir / "Makefile"
    text = makefile.read_text()
    if not re.search(r"^include /usr/src/", text, re.M):
        raise ToaError(f"{makefile} has no `include /usr/src/...` line: the headers layout changed")
    makefile.write_text(re.sub(r"(?<=[\s=])/usr/src/", f"{root}/usr/src/", text))


def cached_packages(release: str) -> KernelPackages | None:
    """The packages of a kernel already fetched into the cache, without reading any index."""
    if not is_debian_release(release):
        return None
    try:
        text = (kernel_dir(release) / ".complete").read_text()
    except OSError:
        return None
    try:
        fields = json.loads(text)
    except ValueError:  # caches written before the marker was JSON hold the dataclass's repr
        fields = dict(re.findall(r"(\w+)='([^']*)'", text))
        fields["headers_pkgs"] = re.findall(r"'(linux-[^']+)'", text.partition("headers_pkgs=")[2])
        fields.setdefault("modules_pkg", None)
    try:
        pkgs = KernelPackages(**{**fields, "headers_pkgs": tuple(fields["headers_pkgs"])})
    except (TypeError, KeyError):
        return None
    return pkgs if pkgs.release == release and pkgs.suite in SUITES else None


def fetch(pkgs: KernelPackages, progress: Callable[[str], None] | None = None) -> KernelTree:
    """Download and unpack a kernel's image, modules and headers into the cache (once)."""
    report = progress or (lambda message: None)
    target = kernel_dir(pkgs.release)
    root = target / "root"
    complete = target / ".complete"
    if complete.exists():
        return _tree(pkgs, root)
    suite = check_suite(pkgs.suite)
    if not all(PACKAGE_RE.fullmatch(p) for p in pkgs.all_pkgs) or not VERSION_RE.fullmatch(pkgs.version):
        raise ToaError(f"refusing unexpected package names or version in {pkgs}")
    _update_index(suite)
    with _exclusive(target.with_name(f"{pkgs.release}.lock")):
        if complete.exists():  # another toa run fetched it while this one waited
            return _tree(pkgs, root)
        shutil.rmtree(target, ignore_errors=True)  # an interrupted fetch is redone from scratch
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="debs-", dir=target) as debs:
            report(f"downloading {len(pkgs.all_pkgs)} packages of {pkgs.release} from {suite.name}")
            _run(
                ["apt-get", *apt_options(suite.name), "download",
                 *(f"{p}={pkgs.version}" for p in pkgs.all_pkgs)],
                f"apt-get download of {pkgs.release}",
                cwd=Path(debs),
            )
            for deb in sorted(Path(debs).glob("*.deb")):
                report(f"unpacking {deb.name}")
                _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        tree = _tree(pkgs, root)
        _point_makefile_into_tree(tree.headers_dir, root)
        complete.write_text(json.dumps(dataclasses.asdict(pkgs)) + "\n")
    return tree


def download(suite_name: str, packages: list[str], dest: Path,
             progress: Callable[[str], None] | None = None) -> list[Path]:
    """The .deb files of PACKAGES (a name, or name=version) from a suite's pockets, into DEST: what a
    host installs from a file (apt-get install ./FILE.deb). Each is checked against the suite's
    signed index by apt."""
    suite = check_suite(suite_name)
    for package in packages:
        name, _, version = package.partition("=")
        if not DEB_NAME_RE.fullmatch(name) or (version and not VERSION_RE.fullmatch(version)):
            raise ToaError(f"invalid package {package[:80]!r}: give a Debian package name, or name=version")
    _update_index(suite)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    if progress:
        progress(f"downloading {', '.join(packages)} from {suite.name}")
    _run(["apt-get", *apt_options(suite.name), "download", *packages], f"apt-get download of {', '.join(packages)}",
         cwd=dest)
    return sorted(set(dest.glob("*.deb")) - before)


def kernel_debs(pkgs: KernelPackages, progress: Callable[[str], None] | None = None) -> list[Path]:
    """The .deb files of a kernel (image, modules, headers, -common, kbuild), downloaded once into the
    cache beside its unpacked tree: what a host installs to upgrade to that kernel."""
    folder = kernel_dir(pkgs.release) / "debs"
    complete = folder / ".complete"
    with _exclusive(kernel_dir(pkgs.release).with_name(f"{pkgs.release}.debs.lock")):
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            if not all(PACKAGE_RE.fullmatch(p) for p in pkgs.all_pkgs) or not VERSION_RE.fullmatch(pkgs.version):
                raise ToaError(f"refusing unexpected package names or version in {pkgs}")
            download(pkgs.suite, [f"{p}={pkgs.version}" for p in pkgs.all_pkgs], folder, progress)
            complete.write_text(json.dumps(dataclasses.asdict(pkgs)) + "\n")
    return sorted(folder.glob("*.deb"))


def check_request(kernel: str | None, suite: str | None) -> None:
    """One Debian kernel asked for: a full release or a suite, not both, not neither."""
    if bool(kernel) == bool(suite):
        raise ToaError("give --kernel RELEASE or --suite SUITE (one of them)")
    if kernel and not is_debian_release(kernel):
        raise ToaError(f"{kernel} is not a Debian kernel release (like 6.1.0-56-amd64): fix --kernel")


def prepare(
    kernel: str | None = None, suite: str | None = None, progress: Callable[[str], None] | None = None
) -> tuple[KernelPackages, KernelTree]:
    """A Debian kernel by full release or by suite (its newest), resolved and fetched into the cache."""
    report = progress or (lambda message: None)
    check_request(kernel, suite)
    report(f"resolve: looking up {kernel or suite} in the package index")
    pkgs = (kernel and cached_packages(kernel)) or (find_release(kernel) if kernel else resolve_suite(suite))
    return pkgs, fetch(pkgs, progress=lambda message: report(f"fetch: {message}"))
