"""Build toa.ko inside a container of the kernel's own distro release, and describe it in a manifest.

The headers' kbuild tools (fixdep, modpost) are linked against their release's glibc and expect its
gcc, so each gets its own build image. Debian kernels: a debootstrap'd root imported as
toa-base:debian-<suite>, then containers/debian/Dockerfile on top, with the headers fetched by
toa.debian mounted in. Other families: the target's containers/<recipe>/Dockerfile on the distro's own
base image, which installs the exact kernel's headers package from the distro's repositories.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable


import toa
from toa import artifacts, debian, preflight, targets
from toa import kernel as kernels
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.resources import CONTAINERS_DIR, MODULE_SOURCE
from toa.targets import Target

if TYPE_CHECKING:
    import docker

DEBIAN_DOCKERFILE_DIR = CONTAINERS_DIR / "debian"
LOG_TAIL_LINES = 30
COMPILER_RE = re.compile(r"([a-z0-9_]+-linux-gnu-)?gcc(-[0-9]+)?")


@dataclass(frozen=True)
class BuildResult:
    ko: Path
    manifest: Path
    skipped: bool = False  # an identical build was already there


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress:
        progress(message)


def docker_client() -> docker.DockerClient:
    """A client for the local engine, or one line saying how to get one."""
    # Imported here, not at the top: --local builds and warm re-runs' start-up need none of the SDK.
    import docker
    import docker.errors

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException:
        raise ToaError(f"Docker engine not reachable at {where}: install docker.io and start dockerd") from None
    return client


def _image(client: docker.DockerClient, tag: str):
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


# ---------------------------------------------------------------- images


def base_image(client: docker.DockerClient, suite: str, progress=None):
    """toa-base:debian-<suite>: a minimal Debian root from debootstrap, imported once."""
    tag = f"toa-base:debian-{suite}"
    existing = _image(client, tag)
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory(prefix="toa-debootstrap-") as scratch:
        root = Path(scratch) / "root"
        debian.debootstrap(suite, root, progress=progress)
        _say(progress, f"importing {tag}")
        archive = Path(scratch) / "root.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        repository, image_tag = tag.split(":")
        client.api.import_image_from_file(str(archive), repository=repository, tag=image_tag)
    return client.images.get(tag)


def headers_compiler(headers_dir: Path) -> str:
    """The compiler command a Debian kernel's headers run, from .kernelvariables (e.g. gcc-12,
    x86_64-linux-gnu-gcc-14 where they set CROSS_COMPILE)."""
    variables = headers_dir / ".kernelvariables"
    text = variables.read_text() if variables.is_file() else ""
    gcc = re.search(r"^CC\s*=.*\)(gcc-[0-9]+)\s*$", text, re.M)
    prefix = re.search(r"^override CROSS_COMPILE\s*=\s*([a-z0-9_]+-linux-gnu-)\s*$", text, re.M)
    command = (prefix.group(1) if prefix else "") + (gcc.group(1) if gcc else "gcc")
    return command if COMPILER_RE.fullmatch(command) else "gcc"


def compiler_package(command: str) -> str:
    """The Debian package providing a compiler command: x86_64-linux-gnu-gcc-14 comes with gcc-14."""
    return re.search(r"gcc(-[0-9]+)?$", command).group()


def build_image(client: docker.DockerClient, suite: str, compiler_pkg: str, progress=None):
    """toa-build:debian-<suite> with the given compiler package, reused when it already has it."""
    tag = f"toa-build:debian-{suite}"
    existing = _image(client, tag)
    if existing is not None and existing.labels.get("org.toa.compiler") == compiler_pkg:
        return existing
    base = base_image(client, suite, progress)
    if not (DEBIAN_DOCKERFILE_DIR / "Dockerfile").is_file():
        raise ToaError(f"{DEBIAN_DOCKERFILE_DIR}/Dockerfile missing: reinstall toa")
    _say(progress, f"building {tag} ({compiler_pkg})")
    return _docker_build(client, DEBIAN_DOCKERFILE_DIR, tag, {
        "BASE": base.tags[0],
        "COMPILER": compiler_pkg,
        "APT_CHECK_VALID_UNTIL": "true" if debian.SUITES[suite].expiring_release else "false",
    }, progress=progress)


def _docker_build(client, path: Path, tag: str, buildargs: dict[str, str], labels: dict[str, str] | None = None,
                  progress: Callable[[str], None] | None = None):
    """Build an image from PATH's Dockerfile, streaming its log lines to PROGRESS; a failed build is
    one ToaError with the log's last lines (the whole log rides along as .build_log)."""
    import docker.errors

    lines: list[str] = []
    image_id, failure = None, None
    try:
        for entry in client.api.build(path=str(path), tag=tag, buildargs=buildargs, labels=labels or {},
                                      pull=False, rm=True, forcerm=True, decode=True):
            for line in re.sub(r"\x1b\[[0-9;]*m", "", entry.get("stream", "")).splitlines():
                lines.append(line.rstrip())
                if line.strip():
                    _say(progress, f"{tag}: {line.strip()[:100]}")
            if "error" in entry:
                failure = entry["error"].strip()
            image_id = (entry.get("aux") or {}).get("ID", image_id)
    except docker.errors.APIError as exc:
        failure = str(exc.explanation or exc)
    if failure or image_id is None:
        tail = " | ".join(line for line in lines[-5:] if line)
        error = ToaError(f"building {tag} failed: {failure or 'no image produced'}: {tail}")
        error.build_log = "\n".join(lines)  # for callers that recognise a known failure in it
        raise error
    return client.images.get(image_id)


# ---------------------------------------------------------------- sources


def source_hash(module_source: Path = MODULE_SOURCE) -> str:
    """sha256 over the module's source files (names and contents), build products left out."""
    digest = hashlib.sha256()
    for path in sorted(module_source.rglob("*")):
        if path.is_file() and not re.search(r"(\.o|\.ko|\.mod|\.mod\.c|\.cmd|\.d|\.order|\.symvers)$", path.name) \
                and path.name != "probes.h":
            digest.update(str(path.relative_to(module_source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------- the module


def _mount_root(headers_dir: Path) -> Path:
    """The unpacked root holding the headers, their -common tree and kbuild (usr/src/<headers>)."""
    if headers_dir.parent.name == "src" and headers_dir.parent.parent.name == "usr":
        return headers_dir.parent.parent.parent
    return headers_dir


def _container_runner(client, image, volumes: dict):
    """Run a command in IMAGE offline, as the invoking user, with the sources at /build."""

    def run(argv: list[str], source: Path | None) -> tuple[int, str]:
        mounts = {**volumes, **({str(source): {"bind": "/build", "mode": "rw"}} if source else {})}
        container = client.containers.run(
            image.id, argv, detach=True, network_disabled=True, user=f"{os.getuid()}:{os.getgid()}",
            environment={"HOME": "/tmp"}, working_dir="/build" if source else "/", volumes=mounts,
        )
        try:
            status = container.wait()
            log = container.logs(stdout=True, stderr=True).decode(errors="replace")
        finally:
            container.remove(force=True)
        return status.get("StatusCode", 1), log

    return run


def _local_runner(argv: list[str], source: Path | None) -> tuple[int, str]:
    """Run a command on this machine (--local builds)."""
    try:
        result = subprocess.run(argv, cwd=source, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToaError(f"{argv[0]} not found: install it (apt-get install build-essential) or build in a container") from None
    return result.returncode, result.stdout + result.stderr


def build_module(
    headers_dir: Path,
    release: str,
    suite: str,
    out_dir: Path = Path("dist"),
    progress: Callable[[str], None] | None = None,
    module_source: Path = MODULE_SOURCE,
    force: bool = False,
) -> BuildResult:
    """Compile toa.ko for one Debian kernel, whose headers are already in HEADERS_DIR, in its suite's
    container; write it, build.log and manifest.json to out_dir/<target>/<release>/ (skipped when an
    identical build is there)."""
    return _build_debian(plan_debian_tree(release, suite, Path(headers_dir), out_dir), Path(headers_dir), progress,
                         module_source, force)


def _build_debian(plan: BuildPlan, headers_dir: Path, progress, module_source: Path, force: bool) -> BuildResult:
    container_suite = debian.check_suite(plan.suite).container
    headers_dir = Path(headers_dir).resolve()
    if not (headers_dir / "Makefile").is_file():
        raise ToaError(f"{headers_dir} holds no kernel headers (no Makefile): fetch the kernel first")
    client = docker_client()
    compiler = headers_compiler(headers_dir)
    image = build_image(client, container_suite, compiler_package(compiler), progress)
    mount = _mount_root(headers_dir)
    return _compile(
        _container_runner(client, image, {str(mount): {"bind": str(mount), "mode": "ro"}}),
        image.id, f"toa-build:debian-{container_suite}", plan.release, plan.output,
        make=["make", f"KDIR={headers_dir}"], compiler=compiler,
        manifest_extra={"suite": plan.suite, "target": plan.target},
        progress=progress, module_source=module_source, force=force, tree_dir=headers_dir,
    )


def debian_target(release: str, suite: str) -> Target:
    """The Debian target a suite's kernel belongs to (trixie-backports' kernels are Debian 13's)."""
    known = kernels.classify(release)
    if known and known.default_targets:
        return known.default_targets[0]
    version = {"bullseye": "11", "bookworm": "12", "trixie": "13"}.get(suite.split("-")[0], "sid")
    return targets.get(f"debian-{version}")


def _error_lines(log: str) -> str:
    """The compiler's and make's own error lines, or the log's tail when none is marked."""
    lines = log.rstrip().splitlines()
    marked = [line for line in lines if re.search(r"(error|Error \d+|undefined!|fatal)", line)]
    return "\n".join((marked or lines)[-LOG_TAIL_LINES:])


def _first_line(result: tuple[int, str]) -> str | None:
    status, output = result
    return output.strip().splitlines()[0] if status == 0 and output.strip() else None


# The target tree's files the preflight reads, copied out of a recipe's build environment ($KDIR there).
_COPY_TREE = ('cd "$KDIR" && for f in "$@"; do if [ -f "$f" ]; then cp --parents "$f" /build/.preflight-tree/; '
              'fi; done')


def _target_tree(run, source: Path, tree_dir: Path | None, release: str, build_name: str) -> preflight.Tree:
    """The preflight's facts of the tree the module was built against: TREE_DIR on this machine, or
    $KDIR inside the build environment (recipes), copied out through the build's scratch directory."""
    if tree_dir is not None:
        return preflight.read_tree(tree_dir, release)
    copied = source / ".preflight-tree"
    copied.mkdir()
    status, log = run(["sh", "-c", _COPY_TREE, "sh", *preflight.TREE_FILES], source)
    if status != 0:
        raise ToaError(f"reading the kernel tree ($KDIR) in {build_name} failed: {log.strip()[-300:]}")
    return preflight.read_tree(copied, release, where=f"$KDIR in {build_name}")


def _compile(
    run, build_id: str, build_name: str, release: str, target: Path, *, make: list[str],
    compiler: str, manifest_extra: dict, progress, module_source: Path, force: bool = False,
    tree_dir: Path | None = None,
) -> BuildResult:
    """Run make on a copy of the module sources (offline, as the invoking user), check with the preflight
    that RELEASE's loader will take the result (TREE_DIR: the tree it was built against, on this machine;
    None: $KDIR in the build environment), and write toa.ko, build.log and manifest.json to TARGET.
    BUILD_ID names the build environment (image id); the same sources, kernel and build environment are
    not built twice."""
    if not (module_source / "Makefile").is_file():
        raise ToaError(f"{module_source} has no Makefile: the module sources are missing")
    digest = source_hash(module_source)
    target = Path(target).resolve()
    if not force and artifacts.up_to_date(target, release, digest, build_id):
        _say(progress, f"up to date: {target}/toa.ko (same sources, kernel and build image)")
        return BuildResult(ko=target / artifacts.KO_NAME, manifest=target / artifacts.MANIFEST_NAME, skipped=True)
    target.mkdir(parents=True, exist_ok=True)
    log_path = target / artifacts.LOG_NAME
    with tempfile.TemporaryDirectory(prefix="toa-build-") as scratch:
        source = Path(scratch) / "src"
        shutil.copytree(module_source, source, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
        _say(progress, f"compiling toa.ko for {release} in {build_name}")
        status, log = run(make, source)
        log_path.write_text(log)
        compiled = source / "toa.ko"
        if status != 0 or not compiled.is_file():
            raise ToaError(
                f"compiling toa.ko for {release} failed (exit {status}); full log in {log_path}:\n{_error_lines(log)}"
            )
        data = compiled.read_bytes()
        module = preflight.read_module(data)
        linker = _first_line(run(["ld", "--version"], None))
        checks = preflight.run(module, _target_tree(run, source, tree_dir, release, build_name), linker)
        refused = preflight.refusal(checks, release)
        if refused:
            raise ToaError(f"{refused}; nothing was written to dist")
        info, vermagic = module.modinfo, module.vermagic
        compiler_version = _first_line(run([compiler, "--version"], None))
        if not compiler_version:
            raise ToaError(f"{compiler} --version failed in {build_name}: remove the image to rebuild it")
    built = artifacts.write(target, data, {
        "toa_version": toa.__version__,
        "module_version": info.get("version"),
        "kernel_release": release,
        **manifest_extra,
        "vermagic": vermagic,
        "srcversion": info.get("srcversion"),
        "source_hash": digest,
        "build_image": {"id": build_id, "tag": build_name},
        "compiler": compiler_version,
        "linker": linker,
        "preflight": preflight.as_manifest(checks),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })  # sha256 and size: toa.ko's, filled in by artifacts.write
    return BuildResult(ko=built.ko, manifest=built.manifest_path)


def build_local(
    release: str, headers_dir: Path, out_dir: Path = Path("dist"), *, target_id: str = "local",
    progress: Callable[[str], None] | None = None, module_source: Path = MODULE_SOURCE, force: bool = False,
) -> BuildResult:
    """Compile toa.ko on this machine against installed headers (no Docker): the operator's own
    `make -C <headers> M=<src>`, with the same checks and manifest as a container build."""
    validate_release(release)
    headers_dir = Path(headers_dir)
    return execute(BuildPlan(release, target_id, "local", None, str(headers_dir),
                             artifacts.directory(out_dir, target_id, release), headers_dir=headers_dir),
                   progress=progress, module_source=module_source, force=force)


def _build_local(plan: BuildPlan, progress, module_source: Path, force: bool) -> BuildResult:
    release, headers_dir = plan.release, plan.headers_dir
    if not (headers_dir / "Makefile").is_file():
        raise ToaError(f"no kernel headers at {headers_dir}: install them (invoke headers --kernel {release}) "
                       "or pass --headers DIR")
    headers_dir = headers_dir.resolve()
    compiler = headers_compiler(headers_dir)
    if shutil.which(compiler) is None:
        compiler = "gcc"
    status, version = _local_runner([compiler, "--version"], None)
    if status != 0:
        raise ToaError(f"{compiler} does not run here: install the compiler the kernel was built with")
    build_id = "local:" + hashlib.sha256(f"{headers_dir}\0{version}".encode()).hexdigest()[:16]
    return _compile(
        _local_runner, build_id, f"this machine ({headers_dir})", release,
        plan.output, make=["make", f"KDIR={headers_dir}"], compiler=compiler,
        manifest_extra={"target": plan.target, "headers": str(headers_dir)}, progress=progress,
        module_source=module_source, force=force, tree_dir=headers_dir,
    )


# ---------------------------------------------------------------- other distros: containers/<recipe>

# CentOS 6 and 7 are end-of-life: their packages are on the vault, one tree per point release, and a
# kernel's first build number says which point release shipped it.
_CENTOS_VAULT = {
    "el6": {71: "6.0", 131: "6.1", 220: "6.2", 279: "6.3", 358: "6.4", 431: "6.5", 504: "6.6", 573: "6.7",
            642: "6.8", 696: "6.9", 754: "6.10"},
    "el7": {123: "7.0.1406", 229: "7.1.1503", 327: "7.2.1511", 514: "7.3.1611", 693: "7.4.1708",
            862: "7.5.1804", 957: "7.6.1810", 1062: "7.7.1908", 1127: "7.8.2003", 1160: "7.9.2009"},
}
# RHEL 8 and 9 kernels of a minor release's first (GA) build carry no _<minor> in their release
# (4.18.0-348.el8 is 8.5's): the build number says which minor shipped it.
_EL_GA_BUILDS = {
    "8": {80: "0", 147: "1", 193: "2", 240: "3", 305: "4", 348: "5", 372: "6", 425: "7", 477: "8", 513: "9",
          553: "10"},
    "9": {70: "0", 162: "1", 284: "2", 362: "3", 427: "4", 503: "5", 570: "6"},
}
# Rocky Linux's first release was 8.3: older minors are on none of its repositories.
_ROCKY_FIRST_MINOR = {"8": 3, "9": 0}
HEADERS_NOT_FOUND_MARK = "toa: headers package not found:"


def with_registry(image: str, registry: str | None) -> str:
    """IMAGE as pulled through REGISTRY (a mirror or proxy cache, e.g. harbor.example.com/hub):
    Docker Hub's official images gain library/, other registries' host part is replaced."""
    if not registry:
        return image
    if not REGISTRY_RE.fullmatch(registry):
        raise ToaError(f"invalid registry {registry!r}: give host[:port][/path], e.g. harbor.example.com/dockerhub")
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        image = rest
    elif not rest:
        image = f"library/{image}"
    return f"{registry.rstrip('/')}/{image}"


REGISTRY_RE = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._-]+)*/?")


def recipe_build_args(target: Target, release: str) -> dict[str, str]:
    """The build arguments of TARGET's containers/ recipe for one kernel release."""
    fedora = re.search(r"\.fc(\d+)\.", release)
    args = {"BASE": target.image.format(fedora=fedora.group(1) if fedora else ""), "KERNEL_RELEASE": release}
    build_number = re.match(r"\d+\.\d+\.\d+-(\d+)", release)
    vaults = _CENTOS_VAULT.get(target.build, {})
    if target.distro == "centos" and build_number and int(build_number.group(1)) in vaults:
        args["CENTOS_VAULT"] = vaults[int(build_number.group(1))]
    compiler = recipe_compiler(target, release)
    if compiler:
        args["COMPILER"] = compiler
    major, minor = el_minor(release)
    if target.distro == "rocky" and minor is not None and int(minor) >= _ROCKY_FIRST_MINOR.get(major, 0):
        # older minor releases' kernels live on Rocky's vault
        args["REPO_URL"] = f"https://dl.rockylinux.org/vault/rocky/{major}.{minor}/AppStream/x86_64/os/"
        args["REPO_GPGKEY"] = "file:///etc/pki/rpm-gpg/" + ("RPM-GPG-KEY-rockyofficial" if major == "8" else f"RPM-GPG-KEY-Rocky-{major}")
    return args


def recipe_compiler(target: Target, release: str) -> str | None:
    """The gcc package a recipe installs and builds with, where its distro packages several (Ubuntu): the
    one targets.toml names for the release's own kernels ("gcc 11/12": 11), or for its HWE kernels (12)."""
    if target.container != "ubuntu":
        return None  # the other recipes' images carry the one gcc their kernels were built with
    majors = [version.split(".")[0] for version in re.findall(r"\d+(?:\.\d+)*", target.compiler)]
    known = kernels.classify(release)
    hwe = known is not None and known.key in target.hwe_kernels
    return f"gcc-{majors[-1] if hwe else majors[0]}" if majors else None


def el_minor(release: str) -> tuple[str | None, str | None]:
    """(major, minor) of the RHEL 8/9 release that shipped a kernel: from its _<minor> suffix
    (4.18.0-513.5.1.el8_9), or for a GA build without one (4.18.0-348.el8), from its build number."""
    suffixed = re.search(r"\.el(\d+)_(\d+)\.", release)
    if suffixed:
        return suffixed.group(1), suffixed.group(2)
    ga = re.match(r"\d+\.\d+\.\d+-(\d+)\.el(\d+)\.", release)
    if ga and ga.group(2) in _EL_GA_BUILDS:
        builds = _EL_GA_BUILDS[ga.group(2)]
        known = [number for number in builds if number <= int(ga.group(1))]
        return ga.group(2), builds[max(known)] if known else None
    return None, None


def repositories_searched(args: dict[str, str]) -> str:
    """Where a recipe looks for the headers package, for error messages."""
    if "CENTOS_VAULT" in args:
        return f"http://vault.centos.org/{args['CENTOS_VAULT']}/{{os,updates}}"
    if "REPO_URL" in args:
        return f"the repositories of {args['BASE']} and {args['REPO_URL']}"
    return f"the repositories configured in {args['BASE']}"


def _recipe_image(client, recipe: Path, tag: str, args: dict[str, str], progress, packages: list[Path]):
    """Build (or reuse) the image of a containers/ recipe; a base image that is not here is pulled
    first. PACKAGES (headers package files the user gave) go into the build context's packages/."""
    import docker.errors

    base = args["BASE"]
    given = ",".join(sorted(hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in packages))
    existing = _image(client, tag)
    labels = {"org.toa.base": base, "org.toa.packages": given, "org.toa.compiler": args.get("COMPILER", "")}
    if existing is not None and all(existing.labels.get(name, "") == value for name, value in labels.items()):
        return existing
    if _image(client, base) is None:
        _say(progress, f"pulling {base}")
        try:
            client.images.pull(base)
        except docker.errors.DockerException as exc:
            reason = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:200]
            raise ToaError(
                f"base image {base} is not here and cannot be pulled ({reason}): "
                "`docker pull`/`docker load` it on this machine, or pass --base-image IMAGE or --registry "
                "MIRROR for a registry you reach"
            ) from None
    _say(progress, f"building {tag} from containers/{recipe.name}")
    with tempfile.TemporaryDirectory(prefix="toa-context-") as context:
        shutil.copytree(recipe, context, dirs_exist_ok=True)
        (Path(context) / "packages").mkdir(exist_ok=True)
        for package in packages:
            shutil.copyfile(package, Path(context) / "packages" / package.name)
        try:
            return _docker_build(client, Path(context), tag, args, labels=labels, progress=progress)
        except ToaError as exc:
            log = getattr(exc, "build_log", "")
            if HEADERS_NOT_FOUND_MARK not in log:
                raise
            # The last mark is the recipe's output (the first is the RUN line echoed by the build).
            found = log.rsplit(HEADERS_NOT_FOUND_MARK, 1)[1].strip().splitlines()
            package = found[0].strip()
            listed = [line.strip() for line in found[1:] if PACKAGE_LINE_RE.fullmatch(line.strip())]
            raise ToaError(
                f"{package} is not in {repositories_searched(args)}; nearest available: "
                f"{', '.join(nearest_packages(package, listed)) or 'none'}; give the package file with --headers-pkg PATH"
            ) from None


PACKAGE_LINE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:=-]*[0-9][A-Za-z0-9._+~:=-]*")


def nearest_packages(wanted: str, available: list[str], count: int = 6) -> list[str]:
    """The COUNT package names that share the longest prefix with WANTED, in the order listed."""
    def shared(name: str) -> int:
        return len(os.path.commonprefix([wanted, name]))
    chosen = set(sorted(available, key=shared, reverse=True)[:count])
    return [name for name in available if name in chosen]


def build_for_target(
    target: Target,
    release: str,
    out_dir: Path = Path("dist"),
    *,
    base: str | None = None,
    registry: str | None = None,
    headers_pkgs: tuple[Path, ...] = (),
    progress: Callable[[str], None] | None = None,
    module_source: Path = MODULE_SOURCE,
    force: bool = False,
) -> BuildResult:
    """Compile toa.ko for a kernel of another distro family in TARGET's containers/ image, whose
    build installs that exact kernel's headers package from the distro's own repositories (or the
    package files given)."""
    return execute(plan_recipe(target, release, out_dir, base=base, registry=registry), headers_pkgs=headers_pkgs,
                   progress=progress, module_source=module_source, force=force)


def _build_recipe(plan: BuildPlan, headers_pkgs: tuple[Path, ...], progress, module_source: Path,
                  force: bool) -> BuildResult:
    packages = [_headers_package_file(path) for path in headers_pkgs]
    client = docker_client()
    image = _recipe_image(client, CONTAINERS_DIR / plan.recipe, plan.image, plan.build_args, progress, packages)
    compiler = plan.build_args.get("COMPILER", "gcc")
    return _compile(
        _container_runner(client, image, {}), image.id, plan.image, plan.release, plan.output,
        make=["make"] + ([f"CC={compiler}"] if compiler != "gcc" else []),
        compiler=compiler, manifest_extra={"target": plan.target, "base_image": plan.build_args["BASE"]},
        progress=progress, module_source=module_source, force=force,
    )


def _headers_package_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file() or not re.fullmatch(r"[A-Za-z0-9._+~-]+\.(rpm|deb)", path.name):
        raise ToaError(f"--headers-pkg {path}: not a .rpm or .deb file here")
    return path.resolve()


# ---------------------------------------------------------------- plans: what a build will do


@dataclass(frozen=True)
class BuildPlan:
    """What `invoke build` will do for one kernel, decided before anything is built; execute() builds
    exactly this, with what planning resolved (the Debian packages, the target, the build arguments)."""

    release: str
    target: str
    method: str  # debian (fetched headers, per-suite image), recipe (containers/<recipe>), local
    image: str | None  # the build image's tag
    headers_package: str
    output: Path
    recipe: str | None = None
    suite: str | None = None
    build_args: dict[str, str] | None = None
    headers_dir: Path | None = None
    also_runs_on: tuple[str, ...] = ()  # other targets that run this kernel (HWE): --distro picks one
    # debian: the packages planning resolved on the mirror, which execute() fetches as they are
    packages: debian.KernelPackages | None = dataclasses.field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {
            "kernel_release": self.release, "target": self.target, "method": self.method, "image": self.image,
            "base_image": (self.build_args or {}).get("BASE") or (f"toa-base:debian-{self.suite}" if self.suite else None),
            "headers_package": self.headers_package, "output": str(self.output / "toa.ko"),
            "recipe": f"containers/{self.recipe}" if self.recipe else None, "suite": self.suite,
            "build_args": self.build_args, "headers_dir": str(self.headers_dir) if self.headers_dir else None,
            "also_runs_on": list(self.also_runs_on),
        }


def plan_recipe(target: Target, release: str, out_dir: Path, *, base: str | None = None,
                registry: str | None = None) -> BuildPlan:
    validate_release(release)
    if not target.container or target.container == "debian":
        raise ToaError(
            f"toa has no container recipe for {target.name} kernels: "
            + ("use --suite/--kernel with a Debian release" if target.container else "see containers/README.md")
        )
    if not (CONTAINERS_DIR / target.container / "Dockerfile").is_file():
        raise ToaError(f"{CONTAINERS_DIR / target.container}/Dockerfile missing: reinstall toa")
    args = recipe_build_args(target, release)
    mirrored = with_registry(args["BASE"], registry)
    if "(user-provided)" in args["BASE"] and not base:
        raise ToaError(f"{target.name} kernels build in its {args['BASE'].replace(' (user-provided)', '')}, which no "
                       f"registry serves: import it (containers/{target.container}/Dockerfile says how) and pass "
                       "--base-image IMAGE")
    args["BASE"] = base or mirrored
    tag = "toa-build:" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{target.id}-{release}")[:120]
    return BuildPlan(release, target.id, "recipe", tag, target.headers_for(release)[0],
                     artifacts.directory(out_dir, target.id, release), recipe=target.container, build_args=args)


def plan_debian(kernel: str | None, suite: str | None, out_dir: Path) -> BuildPlan:
    """A Debian kernel by full release or by suite (its newest), resolved on the mirror once."""
    pkgs = debian.cached_packages(kernel) if kernel else None
    if pkgs is None:
        pkgs = debian.find_release(kernel) if kernel else debian.resolve_suite(debian.check_suite(suite).name)
    target = debian_target(pkgs.release, pkgs.suite)
    container = debian.check_suite(pkgs.suite).container
    return BuildPlan(pkgs.release, target.id, "debian", f"toa-build:debian-{container}", pkgs.headers_pkgs[0],
                     artifacts.directory(out_dir, target.id, pkgs.release), suite=pkgs.suite, packages=pkgs)


def plan_debian_tree(release: str, suite: str, headers_dir: Path, out_dir: Path) -> BuildPlan:
    """A Debian kernel whose headers are already at HEADERS_DIR: nothing to resolve or fetch."""
    validate_release(release)
    target = debian_target(release, suite)
    container = debian.check_suite(suite).container
    return BuildPlan(release, target.id, "debian", f"toa-build:debian-{container}", f"linux-headers-{release}",
                     artifacts.directory(out_dir, target.id, release), suite=suite, headers_dir=Path(headers_dir))


def plan_local(release: str, headers: Path | None, out_dir: Path) -> BuildPlan:
    validate_release(release)
    known = kernels.classify(release)
    target_id = known.default_targets[0].id if known and known.default_targets else "local"
    headers_dir = Path(headers) if headers else Path("/lib/modules") / release / "build"
    return BuildPlan(release, target_id, "local", None, str(headers_dir), artifacts.directory(out_dir, target_id, release),
                     headers_dir=headers_dir)


def running_kernel() -> str:
    return validate_release(platform.uname().release)


def plan(
    kernel: str | None = None, suite: str | None = None, *, distro: str | None = None, base: str | None = None,
    registry: str | None = None, local: bool = False, headers: Path | None = None, out_dir: Path = Path("dist"),
    progress: Callable[[str], None] | None = None,
) -> BuildPlan:
    """Decide how to build for a kernel given as a release of any supported distro (full or partial,
    e.g. 3.10.0-693), as a Debian suite, or not at all (the running kernel)."""
    say = progress or (lambda message: None)
    if kernel and suite:
        raise ToaError("give --kernel RELEASE or --suite SUITE, not both")
    if local:
        if suite:
            raise ToaError("--local builds against installed headers: give --kernel RELEASE (or none), not --suite")
        return plan_local(kernel or running_kernel(), headers, out_dir)
    if headers:
        raise ToaError("--headers DIR goes with --local (container builds fetch or install the headers themselves)")
    if not kernel and not suite:
        kernel = running_kernel()
        if kernels.classify(kernel) is None and not debian.is_debian_release(kernel):
            raise ToaError(f"the running kernel {kernel} belongs to no distro toa knows: give --kernel RELEASE, "
                           "--suite SUITE, or --local to build against its installed headers")
        say(f"resolve: building for the running kernel {kernel}")
    if kernel and not suite and (distro or not debian.is_debian_release(kernel)):
        resolution = kernels.resolve(kernel, distro)
        release, target = resolution.kernel.release, resolution.target
        say(f"resolve: {kernel} is {release} ({target.name})")
        # a kernel other releases run too (Ubuntu's HWE) is built for its own release unless --distro says
        others = () if distro else tuple(t.id for t in resolution.kernel.targets if t.id != target.id)
        if target.container != "debian":
            return dataclasses.replace(plan_recipe(target, release, out_dir, base=base, registry=registry),
                                       also_runs_on=others)
        kernel = release
    if base or registry:
        raise ToaError("--base-image and --registry apply to container recipes; Debian kernels build on images "
                       "toa makes itself with debootstrap (invoke images)")
    return plan_debian(kernel, suite, out_dir)


def build(
    kernel: str | None = None, suite: str | None = None, *, distro: str | None = None, base: str | None = None,
    registry: str | None = None, local: bool = False, headers: Path | None = None,
    headers_pkgs: tuple[Path, ...] = (), out_dir: Path = Path("dist"), force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Plan, then build: Debian kernels through toa.debian, the rest through containers/, or --local."""
    say = progress or (lambda message: None)
    chosen = plan(kernel, suite, distro=distro, base=base, registry=registry, local=local, headers=headers,
                  out_dir=out_dir, progress=say)
    return execute(chosen, headers_pkgs=headers_pkgs, force=force, progress=say)


def execute(
    plan: BuildPlan, *, tree: debian.KernelTree | None = None, headers_pkgs: tuple[Path, ...] = (),
    force: bool = False, progress: Callable[[str], None] | None = None, module_source: Path = MODULE_SOURCE,
) -> BuildResult:
    """Build exactly what PLAN says, with what planning resolved: no kernel is looked up again. A Debian
    plan's headers come from TREE (the kernel a caller already fetched), its headers_dir, or are
    fetched from the packages the plan resolved."""
    say = progress or (lambda message: None)
    if headers_pkgs and plan.method != "recipe":
        raise ToaError("--headers-pkg gives a package to a container recipe; Debian kernels' packages come from "
                       "the mirror (add snapshot.debian.org to apt's sources for removed ones)")
    if plan.method == "local":
        return _build_local(plan, say, module_source, force)
    if plan.method == "recipe":
        return _build_recipe(plan, tuple(headers_pkgs), say, module_source, force)
    if tree is not None and tree.release != plan.release:
        raise ToaError(f"the fetched kernel is {tree.release}, the plan's {plan.release}: plan and fetch the same one")
    headers_dir = tree.headers_dir if tree is not None else plan.headers_dir
    if headers_dir is None:
        if plan.packages is None:
            raise ToaError(f"the plan for {plan.release} carries neither its Debian packages nor headers: "
                           "make it with toa.build.plan()")
        headers_dir = debian.fetch(plan.packages, progress=lambda message: say(f"fetch: {message}")).headers_dir
    return _build_debian(plan, headers_dir, lambda message: say(f"build: {message}"), module_source, force)


def build_kernel(kernel: str | None = None, suite: str | None = None, **options) -> BuildResult:
    """build() for one kernel given by release or suite (kept for callers that name it so)."""
    if not kernel and not suite:
        raise ToaError("give --kernel RELEASE or --suite SUITE")
    return build(kernel, suite, **options)
