"""Build toa.ko inside a container of the kernel's own distro release, and describe it in a manifest.

The headers' kbuild tools (fixdep, modpost) are linked against their release's glibc and expect its
gcc, so each gets its own build image. Debian kernels: a debootstrap'd root imported as
toa-base:debian-<suite>, then containers/debian/Dockerfile on top, with the headers fetched by
toa.debian mounted in. Other families: the target's containers/<recipe>/Dockerfile on the distro's own
base image, which installs the exact kernel's headers package from the distro's repositories.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import docker
import docker.errors

import toa
from toa import debian
from toa import kernel as kernels
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.ko import modinfo
from toa.targets import Target

MODULE_SOURCE = Path(toa.__file__).parent / "module"
# The recipes: beside the package in a source tree (and editable installs), else where pip put them.
CONTAINERS_DIR = next(
    (path for path in (Path(toa.__file__).parent.parent / "containers", Path(sys.prefix) / "share" / "toa" / "containers")
     if path.is_dir()),
    Path(toa.__file__).parent.parent / "containers",
)
DEBIAN_DOCKERFILE_DIR = CONTAINERS_DIR / "debian"
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")
LOG_TAIL_LINES = 30
COMPILER_RE = re.compile(r"([a-z0-9_]+-linux-gnu-)?gcc(-[0-9]+)?")


@dataclass(frozen=True)
class BuildResult:
    ko: Path
    manifest: Path


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress:
        progress(message)


def docker_client() -> docker.DockerClient:
    """A client for the local engine, or one line saying how to get one."""
    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException:
        raise ToaError(f"Docker engine not reachable at {where}: install docker.io and start dockerd") from None
    return client


def _image(client: docker.DockerClient, tag: str):
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
    if shutil.which("debootstrap") is None:
        raise ToaError("debootstrap not found: apt-get install debootstrap")
    mirror = debian.mirror_for("debian")
    if mirror is None:
        raise ToaError("no Debian mirror in apt's sources to debootstrap from: add one to /etc/apt/sources.list.d/")
    # Suites newer than this debootstrap (forky) bootstrap like sid.
    script = DEBOOTSTRAP_SCRIPTS / suite
    if not script.exists():
        script = DEBOOTSTRAP_SCRIPTS / "sid"
    with tempfile.TemporaryDirectory(prefix="toa-debootstrap-") as scratch:
        root = Path(scratch) / "root"
        _say(progress, f"debootstrap {suite} from {mirror}")
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, str(root), mirror, str(script)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
            raise ToaError(f"debootstrap of {suite} failed: {tail}")
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
        raise ToaError(f"{DEBIAN_DOCKERFILE_DIR}/Dockerfile missing: run toa from its source tree")
    _say(progress, f"building {tag} ({compiler_pkg})")
    return _docker_build(client, DEBIAN_DOCKERFILE_DIR, tag, {
        "BASE": base.tags[0],
        "COMPILER": compiler_pkg,
        "APT_CHECK_VALID_UNTIL": "true" if debian.SUITES[suite].expiring_release else "false",
    })


def _docker_build(client, path: Path, tag: str, buildargs: dict[str, str], labels: dict[str, str] | None = None):
    """Build an image from PATH's Dockerfile; a failed build is one ToaError with the log's last lines."""
    try:
        image, _ = client.images.build(path=str(path), tag=tag, buildargs=buildargs, labels=labels or {},
                                       pull=False, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", entry["stream"]).rstrip() for entry in exc.build_log if entry.get("stream")]
        tail = " | ".join(line for line in lines[-5:] if line)
        raise ToaError(f"building {tag} failed: {exc.msg}: {tail}") from None
    return image


# ---------------------------------------------------------------- the module


def _mount_root(headers_dir: Path) -> Path:
    """The unpacked root holding the headers, their -common tree and kbuild (usr/src/<headers>)."""
    if headers_dir.parent.name == "src" and headers_dir.parent.parent.name == "usr":
        return headers_dir.parent.parent.parent
    return headers_dir


def _run_in_container(client, image, argv: list[str], volumes: dict, workdir: str) -> tuple[int, str]:
    container = client.containers.run(
        image.id,
        argv,
        detach=True,
        network_disabled=True,
        user=f"{os.getuid()}:{os.getgid()}",
        environment={"HOME": "/tmp"},
        working_dir=workdir,
        volumes=volumes,
    )
    try:
        status = container.wait()
        log = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    return status.get("StatusCode", 1), log


def build_module(
    headers_dir: Path,
    release: str,
    suite: str,
    out_dir: Path = Path("dist"),
    progress: Callable[[str], None] | None = None,
    module_source: Path = MODULE_SOURCE,
) -> BuildResult:
    """Compile toa.ko for one kernel in its suite's container; write it and manifest.json to out_dir/<release>/."""
    validate_release(release)
    container_suite = debian.check_suite(suite).container
    headers_dir = Path(headers_dir).resolve()
    if not (headers_dir / "Makefile").is_file():
        raise ToaError(f"{headers_dir} holds no kernel headers (no Makefile): fetch the kernel first")
    client = docker_client()
    compiler = headers_compiler(headers_dir)
    image = build_image(client, container_suite, compiler_package(compiler), progress)
    mount = _mount_root(headers_dir)
    return _compile(
        client, image, f"toa-build:debian-{container_suite}", release, out_dir,
        make=["make", f"KDIR={headers_dir}"], volumes={str(mount): {"bind": str(mount), "mode": "ro"}},
        compiler=compiler, manifest_extra={"suite": suite}, progress=progress, module_source=module_source,
    )


def _compile(
    client, image, image_tag: str, release: str, out_dir: Path, *, make: list[str], volumes: dict,
    compiler: str, manifest_extra: dict, progress, module_source: Path,
) -> BuildResult:
    """Run make on a copy of the module sources in IMAGE (offline, as the invoking user), check the
    result is for RELEASE, and write toa.ko, build.log and manifest.json to out_dir/<release>/."""
    if not (module_source / "Makefile").is_file():
        raise ToaError(f"{module_source} has no Makefile: the module sources are missing")
    target = Path(out_dir).resolve() / release
    target.mkdir(parents=True, exist_ok=True)
    log_path = target / "build.log"
    with tempfile.TemporaryDirectory(prefix="toa-build-") as scratch:
        source = Path(scratch) / "src"
        shutil.copytree(module_source, source, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
        _say(progress, f"compiling toa.ko for {release} in {image_tag}")
        status, log = _run_in_container(
            client, image, make, {str(source): {"bind": "/build", "mode": "rw"}, **volumes}, "/build"
        )
        log_path.write_text(log)
        built = source / "toa.ko"
        if status != 0 or not built.is_file():
            tail = "\n".join(log.rstrip().splitlines()[-LOG_TAIL_LINES:])
            raise ToaError(
                f"compiling toa.ko for {release} failed (exit {status}); full log in {log_path}:\n{tail}"
            )
        ko = target / "toa.ko"
        shutil.copyfile(built, ko)
    status, compiler_version = _run_in_container(client, image, [compiler, "--version"], {}, "/")
    if status != 0 or not compiler_version.strip():
        raise ToaError(f"{compiler} --version failed in {image_tag}: remove the image to rebuild it")

    info = modinfo(ko)
    vermagic = info.get("vermagic", "")
    if vermagic.split(" ", 1)[0] != release:
        raise ToaError(f"{ko} has vermagic {vermagic!r}, not for {release}: the headers are for another kernel")
    data = ko.read_bytes()
    manifest = {
        "toa_version": toa.__version__,
        "kernel_release": release,
        **manifest_extra,
        "vermagic": vermagic,
        "srcversion": info.get("srcversion"),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "build_image": {"id": image.id, "tag": image_tag},
        "compiler": compiler_version.strip().splitlines()[0],
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest_path = target / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return BuildResult(ko=ko, manifest=manifest_path)


# ---------------------------------------------------------------- other distros: containers/<recipe>

# CentOS 7 is end-of-life: its packages are on the vault, one tree per point release, and a kernel's
# first build number says which point release shipped it.
_CENTOS7_VAULT = {123: "7.0.1406", 229: "7.1.1503", 327: "7.2.1511", 514: "7.3.1611", 693: "7.4.1708",
                  862: "7.5.1804", 957: "7.6.1810", 1062: "7.7.1908", 1127: "7.8.2003", 1160: "7.9.2009"}


def recipe_build_args(target: Target, release: str) -> dict[str, str]:
    """The build arguments of TARGET's containers/ recipe for one kernel release."""
    fedora = re.search(r"\.fc(\d+)\.", release)
    args = {"BASE": target.image.format(fedora=fedora.group(1) if fedora else ""), "KERNEL_RELEASE": release}
    build_number = re.match(r"\d+\.\d+\.\d+-(\d+)", release)
    if target.container == "rhel7" and build_number and int(build_number.group(1)) in _CENTOS7_VAULT:
        args["CENTOS_VAULT"] = _CENTOS7_VAULT[int(build_number.group(1))]
    minor = re.search(r"\.el(\d+)_(\d+)\.", release)
    if target.distro == "rocky" and minor:  # older minor releases' kernels live on Rocky's vault
        major = minor.group(1)
        args["REPO_URL"] = f"https://dl.rockylinux.org/vault/rocky/{major}.{minor.group(2)}/AppStream/x86_64/os/"
        args["REPO_GPGKEY"] = "file:///etc/pki/rpm-gpg/" + ("RPM-GPG-KEY-rockyofficial" if major == "8" else f"RPM-GPG-KEY-Rocky-{major}")
    return args


def _recipe_image(client, recipe: Path, tag: str, args: dict[str, str], progress):
    """Build (or reuse) the image of a containers/ recipe; a base image that is not here is pulled first."""
    base = args["BASE"]
    existing = _image(client, tag)
    if existing is not None and existing.labels.get("org.toa.base") == base:
        return existing
    if _image(client, base) is None:
        _say(progress, f"pulling {base}")
        try:
            client.images.pull(base)
        except docker.errors.DockerException as exc:
            reason = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:200]
            raise ToaError(
                f"base image {base} is not here and cannot be pulled ({reason}): "
                "`docker pull`/`docker load` it on this machine, or pass --base IMAGE from a registry you reach"
            ) from None
    _say(progress, f"building {tag} from containers/{recipe.name}")
    return _docker_build(client, recipe, tag, args, labels={"org.toa.base": base})


def build_for_target(
    target: Target,
    release: str,
    out_dir: Path = Path("dist"),
    *,
    base: str | None = None,
    progress: Callable[[str], None] | None = None,
    module_source: Path = MODULE_SOURCE,
) -> BuildResult:
    """Compile toa.ko for a kernel of another distro family in TARGET's containers/ image, whose
    build installs that exact kernel's headers package from the distro's own repositories."""
    validate_release(release)
    if not target.container or target.container == "debian":
        raise ToaError(
            f"toa has no container recipe for {target.name} kernels: "
            + ("use --suite/--kernel with a Debian release" if target.container else "see containers/README.md")
        )
    recipe = CONTAINERS_DIR / target.container
    if not (recipe / "Dockerfile").is_file():
        raise ToaError(f"{recipe}/Dockerfile missing: run toa from its source tree")
    args = recipe_build_args(target, release)
    if base:
        args["BASE"] = base
    client = docker_client()
    tag = "toa-build:" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{target.id}-{release}")[:120]
    image = _recipe_image(client, recipe, tag, args, progress)
    return _compile(
        client, image, tag, release, out_dir, make=["make"], volumes={}, compiler="gcc",
        manifest_extra={"target": target.id, "base_image": args["BASE"]}, progress=progress,
        module_source=module_source,
    )


def build_kernel(
    kernel: str | None = None,
    suite: str | None = None,
    *,
    distro: str | None = None,
    base: str | None = None,
    out_dir: Path = Path("dist"),
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build for a kernel given as a Debian suite, or as a release of any supported distro (full or
    partial, e.g. 3.10.0-693): Debian kernels through toa.debian, the rest through containers/."""
    say = progress or (lambda message: None)
    if kernel and not suite and not debian.is_debian_release(kernel):
        resolution = kernels.resolve(kernel, distro)
        release, target = resolution.kernel.release, resolution.target
        say(f"resolve: {kernel} is {release} ({target.name})")
        if target.container != "debian":
            return build_for_target(target, release, out_dir, base=base, progress=say)
        kernel = release
    pkgs, tree = debian.prepare(kernel, suite, progress=say)
    return build_module(tree.headers_dir, tree.release, pkgs.suite, out_dir,
                        progress=lambda message: say(f"build: {message}"))
