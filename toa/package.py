"""Packages for package managers: a DKMS source package that rebuilds toa.ko on every kernel upgrade,
and per-kernel kmod packages (.deb, .rpm) of the modules built in dist/.

DKMS: toa-dkms_<ver>_all.deb puts the module sources and a dkms.conf in /usr/src/toa-<ver>/; its
postinst hands them to DKMS the way Debian's dh_dkms does. toa-<ver>-dkms.tar.gz carries the same
tree as `dkms_source_tree/` (the layout `dkms ldtarball` loads; unpacked by hand, copy that folder to
/usr/src/toa-<ver>/ and run `dkms install toa/<ver>`).
kmod: toa-kmod-<release> packages install dist's toa.ko for one kernel under
/lib/modules/<release>/extra/, run depmod and carry the files that load it at boot.
SUSE (--format rpm, a module built for a SUSE target): a kernel module package (KMP) as SUSE's
own are made, toa-kmp-<flavor>-<ver>_k<kernel version>-1: toa.ko in /lib/modules/<release>/updates/,
the kernel symbols it was built against as ksym(<flavor>:<symbol>) = <crc> requirements (what SUSE's
kernel packages provide), and %post/%postun handing it to suse-module-tools' weak-modules2
(--add-kmp/--remove-kmp), which indexes it and links it into every installed kernel whose kABI it
fits (weak-updates/), as the kernel package's own %post (weak-modules2 --add-kernel) does for a
kernel installed later; without weak-modules2 they run depmod.
bpf: one toa-bpf package (.deb or .rpm) for every kernel from 5.10: the eBPF engine's static loader in
/usr/sbin and toa-bpf.service in the distro's unit directory, enabled and started on install; it
conflicts with toa-common, so a host runs one engine.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import jinja2

import toa
from toa import artifacts, preflight, render, targets
from toa.artifacts import Artifact
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.ko import read_module
from toa.render import AutoloadFile
from toa.resources import PACKAGE_TEMPLATES_DIR

MODULE_SOURCE = render.MODULE_SOURCE
TEMPLATES_DIR = PACKAGE_TEMPLATES_DIR
FORMATS = ("dkms", "deb", "rpm")
ENGINES = ("module", "bpf")
MAINTAINER = "toa project <toa@packages.invalid>"
# Module sources only: what a build in the source folder leaves behind stays out of packages.
BUILD_OUTPUTS = render.BUILD_OUTPUTS
MODULE_VERSION_RE = re.compile(r'^MODULE_VERSION\("([^"]+)"\);', re.M)


def module_version(source: Path = MODULE_SOURCE) -> str:
    """toa's version, which the module's MODULE_VERSION must repeat (DKMS and packages use it)."""
    match = MODULE_VERSION_RE.search((source / "toa.c").read_text())
    if not match or match.group(1) != toa.__version__:
        found = match.group(1) if match else "none"
        raise ToaError(f"toa.c's MODULE_VERSION ({found}) differs from toa {toa.__version__}: make them the same")
    return toa.__version__


def autoload_files(artifact: Artifact, options: dict[str, str] | None = None) -> list[AutoloadFile]:
    """The files that load toa at boot, with module OPTIONS, on a systemd host of the module's target
    (a package manager's host): whole files a package can own."""
    target_id = artifact.manifest.get("target")
    if not target_id:
        raise ToaError(f"{artifact.manifest_path} names no target: rebuild with `invoke build --kernel {artifact.release}`")
    target = targets.get(target_id)
    files = render.autoload_files(target, artifact.release, init="systemd", options=options) + render.hook_sources(target)
    shared = [file.path for file in files if file.kind != "file"]
    if shared or render.module_path(target, artifact.release) != f"/lib/modules/{artifact.release}/extra/toa.ko":
        raise ToaError(f"{target_id} hosts do not take toa from a package ({', '.join(shared) or 'read-only /lib/modules'}): "
                       "use `invoke deploy` for them")
    return files


def package_name(release: str) -> str:
    """toa-kmod-<release>, in the characters package names allow (lower case, digits, + . -)."""
    return "toa-kmod-" + re.sub(r"[^a-z0-9+.-]", "-", validate_release(release).lower())


def render_package_template(name: str, **values) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["shell_quote"] = shlex.quote
    try:
        return env.get_template(name).render(**values)
    except jinja2.TemplateNotFound:
        raise ToaError(f"package template {name} not in {TEMPLATES_DIR}: reinstall toa") from None


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToaError(f"{name} not found: install the {package} package (apt-get install {package})")
    return path


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
        raise ToaError(f"{what} failed (exit {result.returncode}): {tail}")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _stage_sources(destination: Path, version: str) -> None:
    """The module sources plus dkms.conf, as DKMS wants them in /usr/src/toa-<version>/."""
    shutil.copytree(MODULE_SOURCE, destination, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    _write(destination / "dkms.conf", render_package_template("dkms.conf.j2", version=version))


def _dpkg_deb(root: Path, deb: Path) -> Path:
    deb.parent.mkdir(parents=True, exist_ok=True)
    _run([_tool("dpkg-deb", "dpkg"), "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
         f"dpkg-deb --build {deb.name}")
    return deb


def _owned_by_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def dkms_packages(out_dir: Path, progress: Callable[[str], None] | None = None) -> list[Path]:
    """toa-dkms_<ver>_all.deb, toa-dkms-<ver>-1.noarch.rpm and toa-<ver>-dkms.tar.gz in OUT_DIR."""
    say = progress or (lambda message: None)
    version = module_version()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-dkms-") as scratch_name:
        root = Path(scratch_name) / "root"
        _stage_sources(root / "usr/src" / f"toa-{version}", version)
        values = {"version": version, "maintainer": MAINTAINER}
        _write(root / "DEBIAN/control", render_package_template("dkms-control.j2", **values))
        _write(root / "DEBIAN/postinst", render_package_template("dkms-postinst.j2", **values), 0o755)
        _write(root / "DEBIAN/prerm", render_package_template("dkms-prerm.j2", **values), 0o755)
        say(f"building toa-dkms_{version}_all.deb")
        deb = _dpkg_deb(root, out_dir / f"toa-dkms_{version}_all.deb")
        tarball = out_dir / f"toa-{version}-dkms.tar.gz"
        say(f"writing {tarball.name}")
        with tarfile.open(tarball, "w:gz") as archive:
            archive.add(root / "usr/src" / f"toa-{version}", arcname="dkms_source_tree", filter=_owned_by_root)
        rpm_root = Path(scratch_name) / "rpm-root"  # the sources alone, without the .deb's control files
        shutil.copytree(root / "usr", rpm_root / "usr")
        rpm = _rpmbuild(render_package_template("dkms.spec.j2", version=version, staged=rpm_root),
                        Path(scratch_name), out_dir.resolve(), f"toa-dkms-{version}-1.noarch.rpm", progress)
    return [deb, rpm, tarball]


COMMON_NAME = "toa-common"


def common_files(artifacts: list[Artifact], options: dict[str, str] | None) -> list[AutoloadFile]:
    """The boot files every kernel's package shares, owned once by toa-common (so that packages of
    several kernels install side by side); one set for all ARTIFACTS."""
    sets = {}
    for artifact in artifacts:
        files = autoload_files(artifact, options)
        sets.setdefault(tuple((f.path, f.content, f.mode) for f in files), (artifact, files))
    if len(sets) > 1:
        names = ", ".join(sorted({a.manifest["target"] for a, _ in sets.values()}))
        raise ToaError(f"the modules under dist/ are for hosts that load toa at boot differently ({names}): "
                       "package each target's kernels separately with --kernel")
    return next(iter(sets.values()))[1]


def _is_config(file: AutoloadFile) -> bool:
    """A file the administrator may edit (a conffile, %config): what toa writes in /etc, not its sources."""
    return file.path.startswith("/etc/")


def common_deb(files: list[AutoloadFile], out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """toa-common_<ver>_all.deb: the files that load toa at boot, as configuration files."""
    version = module_version()
    with tempfile.TemporaryDirectory(prefix="toa-common-deb-") as scratch_name:
        root = Path(scratch_name) / "root"
        for file in files:
            _write(root / file.path.lstrip("/"), file.content, file.mode)
        _write(root / "DEBIAN/control", render_package_template("common-control.j2", version=version,
                                                                 maintainer=MAINTAINER))
        _write(root / "DEBIAN/conffiles", "".join(f"{file.path}\n" for file in files if _is_config(file)))
        if progress:
            progress(f"building {COMMON_NAME}_{version}_all.deb")
        return _dpkg_deb(root, Path(out_dir) / f"{COMMON_NAME}_{version}_all.deb")


def kmod_deb(artifact: Artifact, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """toa-kmod-<release>_<ver>_amd64.deb: toa.ko for one kernel, beside those of other kernels."""
    version = module_version()
    name = package_name(artifact.release)
    values = {"package": name, "version": version, "release": artifact.release, "common": COMMON_NAME,
              "vermagic": artifact.manifest.get("vermagic", ""), "maintainer": MAINTAINER}
    with tempfile.TemporaryDirectory(prefix="toa-kmod-deb-") as scratch_name:
        root = Path(scratch_name) / "root"
        _stage_module(root, artifact)
        _write(root / "DEBIAN/control", render_package_template("kmod-control.j2", **values))
        _write(root / "DEBIAN/postinst", render_package_template("kmod-postinst.j2", **values), 0o755)
        _write(root / "DEBIAN/postrm", render_package_template("kmod-postrm.j2", **values), 0o755)
        if progress:
            progress(f"building {name}_{version}_amd64.deb")
        return _dpkg_deb(root, Path(out_dir) / f"{name}_{version}_amd64.deb")


def _stage_module(root: Path, artifact: Artifact, subdir: str = render.MODULE_SUBDIR) -> None:
    module_dir = root / "lib/modules" / artifact.release / subdir
    module_dir.mkdir(parents=True)
    shutil.copyfile(artifact.ko, module_dir / "toa.ko")


def _rpmbuild(spec_text: str, scratch: Path, out_dir: Path, rpm_name: str,
              progress: Callable[[str], None] | None) -> Path:
    rpmbuild = _tool("rpmbuild", "rpm")
    spec = scratch / "package.spec"
    _write(spec, spec_text)
    if progress:
        progress(f"building {rpm_name}")
    _run([rpmbuild, "-bb", "--quiet",
          "--define", f"_topdir {scratch / 'rpmbuild'}",
          "--define", f"_rpmdir {out_dir}",
          "--define", "_rpmfilename %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm",
          str(spec)], f"rpmbuild of {rpm_name}")
    return out_dir / rpm_name


def common_rpm(files: list[AutoloadFile], out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """toa-common-<ver>-1.noarch.rpm: the files that load toa at boot, as %config(noreplace)."""
    _tool("rpmbuild", "rpm")
    version = module_version()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-common-rpm-") as scratch_name:
        scratch = Path(scratch_name)
        staged = scratch / "root"
        for file in files:
            _write(staged / file.path.lstrip("/"), file.content, file.mode)
        spec = render_package_template(
            "common.spec.j2", package=COMMON_NAME, version=version, staged=staged,
            config_files=sorted(file.path.lstrip("/") for file in files if _is_config(file)),
            # the hooks' sources: the folder and all in it (owned, so removing the package removes it)
            source_dir=render.hook_source_dir() if any(not _is_config(file) for file in files) else "")
        return _rpmbuild(spec, scratch, out_dir, f"{COMMON_NAME}-{version}-1.noarch.rpm", progress)


def kmod_rpm(artifact: Artifact, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """toa-kmod-<release>-<ver>-1.x86_64.rpm: toa.ko for one kernel, made with rpmbuild."""
    _tool("rpmbuild", "rpm")
    version = module_version()
    name = package_name(artifact.release)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-kmod-rpm-") as scratch_name:
        scratch = Path(scratch_name)
        staged = scratch / "root"
        _stage_module(staged, artifact)
        spec = render_package_template("kmod.spec.j2", package=name, version=version, release=artifact.release,
                                       common=COMMON_NAME, vermagic=artifact.manifest.get("vermagic", ""),
                                       staged=staged)
        return _rpmbuild(spec, scratch, out_dir, f"{name}-{version}-1.x86_64.rpm", progress)


KMP_SUBDIR = "updates"  # where SUSE's KMPs put their modules (depmod searches it first)
KMP_RELEASE = "1"
WEAK_MODULES2 = "/usr/lib/module-init-tools/weak-modules2"  # suse-module-tools'


def kmp_name(release: str) -> tuple[str, str]:
    """(name, version) of the KMP of toa.ko for RELEASE, as SUSE names them: toa-kmp-<flavor> and
    <toa version>_k<kernel version, - as _> (6.4.0-150600.23.7-default: toa-kmp-default,
    <ver>_k6.4.0_150600.23.7); one name for every kernel of a flavor, so zypper keeps them side by side."""
    kernel, _, flavor = validate_release(release).rpartition("-")
    if not kernel or not re.fullmatch(r"[a-z][a-z0-9_]*", flavor):
        raise ToaError(f"kernel release {release} does not end in a SUSE flavor (-default, -azure): "
                       "a KMP is made for SUSE kernels only")
    return f"toa-kmp-{flavor}", f"{module_version()}_k{re.sub(r'[^A-Za-z0-9.+]', '_', kernel)}"


def kmp_symbols(module: preflight.Module, flavor: str) -> list[str]:
    """ksym(FLAVOR:<symbol>) = <crc> for each kernel symbol MODULE imports, the capabilities SUSE's
    kernel packages provide (crc in lower-case hex without leading zeros, as theirs)."""
    return [f"ksym({flavor}:{symbol}) = {crc:x}" for symbol, crc in sorted(module.crcs.items())]


def kmp_rpm(artifact: Artifact, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """toa-kmp-<flavor>-<ver>_k<kernel>-1.x86_64.rpm: toa.ko for one SUSE kernel, as a KMP."""
    _tool("rpmbuild", "rpm")
    name, version = kmp_name(artifact.release)
    flavor = name.removeprefix("toa-kmp-")
    # A kernel built with CONFIG_SUSE_KERNEL_SUPPORTED refuses a module without a supported tag; toa's
    # build tags it supported=external for such a kernel, and its preflight check says whether it had to.
    supported = next((check for check in artifact.manifest.get("preflight", []) if check.get("name") == "supported"),
                     {"ok": True})
    if not supported.get("ok"):
        raise ToaError(f"{artifact.ko} failed the supported check of its build ({supported.get('detail')}): "
                       f"rebuild it with `invoke build --kernel {artifact.release}`")
    module = preflight.read_module(read_module(artifact.ko))
    tag = module.modinfo.get("supported", "none (the kernel checks no tag)")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-kmp-rpm-") as scratch_name:
        scratch = Path(scratch_name)
        staged = scratch / "root"
        _stage_module(staged, artifact, KMP_SUBDIR)
        spec = render_package_template(
            "kmp.spec.j2", package=name, version=version, rpm_release=KMP_RELEASE, toa_version=module_version(),
            nvr=f"{name}-{version}-{KMP_RELEASE}",
            release=artifact.release, flavor=flavor, common=COMMON_NAME,
            vermagic=artifact.manifest.get("vermagic", ""), supported=tag, staged=staged,
            module=f"/lib/modules/{artifact.release}/{KMP_SUBDIR}/toa.ko", weak_modules2=WEAK_MODULES2,
            symbols=kmp_symbols(module, flavor))
        return _rpmbuild(spec, scratch, out_dir, f"{name}-{version}-{KMP_RELEASE}.x86_64.rpm", progress)


def module_rpm(artifact: Artifact, out_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """The rpm of toa.ko for one kernel, in its family's convention: a KMP for SUSE, else a kmod rpm."""
    if targets.get(artifact.manifest["target"]).family == "suse":
        return kmp_rpm(artifact, out_dir, progress)
    return kmod_rpm(artifact, out_dir, progress)


BPF_PACKAGE = "toa-bpf"
# Where packages put systemd units: Debian's /lib (merged-/usr or not), the RPM distros' /usr/lib.
UNIT_DIRS = {"deb": "/lib/systemd/system", "rpm": "/usr/lib/systemd/system"}


def bpf_package(package_format: str, built: artifacts.BpfArtifact, out_dir: Path,
                options: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """toa-bpf_<ver>_amd64.deb or toa-bpf-<ver>-1.x86_64.rpm: BUILT's loader as /usr/sbin/toa-bpf and
    toa-bpf.service (attaching with OPTIONS), for every kernel from 5.10."""
    version = toa.__version__
    unit = f"{UNIT_DIRS[package_format]}/{render.BPF_UNIT_NAME}"
    values = {"package": BPF_PACKAGE, "version": version, "maintainer": MAINTAINER, "common": COMMON_NAME,
              "loader": render.PACKAGED_BPF_LOADER, "unit_name": render.BPF_UNIT_NAME, "unit": unit,
              "object_sha256": built.object_sha256}
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="toa-bpf-package-") as scratch_name:
        scratch = Path(scratch_name)
        root = scratch / "root"
        loader = root / render.PACKAGED_BPF_LOADER.lstrip("/")
        loader.parent.mkdir(parents=True)
        shutil.copyfile(built.loader, loader)
        loader.chmod(0o755)
        _write(root / unit.lstrip("/"), render.bpf_unit(unit, render.PACKAGED_BPF_LOADER, options).content)
        if package_format == "rpm":
            _tool("rpmbuild", "rpm")
            return _rpmbuild(render_package_template("bpf.spec.j2", staged=root, **values), scratch, out_dir,
                             f"{BPF_PACKAGE}-{version}-1.x86_64.rpm", progress)
        _write(root / "DEBIAN/control", render_package_template("bpf-control.j2", **values))
        for script in ("postinst", "prerm", "postrm"):
            _write(root / "DEBIAN" / script, render_package_template(f"bpf-{script}.j2", **values), 0o755)
        if progress:
            progress(f"building {BPF_PACKAGE}_{version}_amd64.deb")
        return _dpkg_deb(root, out_dir / f"{BPF_PACKAGE}_{version}_amd64.deb")


def build_packages(
    package_format: str, dist: Path = Path("dist"), kernels: list[str] | None = None,
    out_dir: Path | None = None, progress: Callable[[str], None] | None = None,
    options: dict[str, str] | None = None, engine: str = "module",
) -> list[Path]:
    """Packages in PACKAGE_FORMAT (dkms, deb or rpm) in OUT_DIR (default: <dist>/packages); deb and
    rpm: toa-common (the boot files, loading with module OPTIONS) and one package per module built
    under DIST for KERNELS (default: every one there): toa-kmod-<release>, or a SUSE target's KMP.
    ENGINE bpf: the toa-bpf package of the eBPF engine built in <dist>/bpf instead."""
    if package_format not in FORMATS:
        raise ToaError(f"unknown package format {package_format!r}: use one of {', '.join(FORMATS)}")
    if engine not in ENGINES:
        raise ToaError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    out_dir = Path(out_dir) if out_dir else Path(dist) / "packages"
    if engine == "bpf":
        if package_format == "dkms" or kernels:
            raise ToaError("the eBPF engine is one package for every kernel from 5.10: give --format deb or rpm, "
                           "and no --kernel")
        render.module_options(options)
        return [bpf_package(package_format, artifacts.BpfArtifact.from_dir(artifacts.bpf_directory(dist)), out_dir, options,
                            progress)]
    if package_format == "dkms":
        if kernels:
            raise ToaError("--kernel is for deb and rpm: the DKMS package builds on each machine for its kernels")
        if options:
            raise ToaError("--option is for deb and rpm: the DKMS package installs no boot-time files; "
                           "give options with `invoke render` or `invoke deploy`")
        return dkms_packages(out_dir, progress)
    render.module_options(options)  # bad options fail before anything else
    built = artifacts.find_all(Path(dist), kernels)
    files = common_files(built, options)  # so do modules of targets that load toa differently
    if package_format == "deb" and any(targets.get(a.manifest["target"]).family == "suse" for a in built):
        raise ToaError("SUSE hosts install rpm packages: give --format rpm (toa.ko goes in as a KMP, toa-kmp-<flavor>)")
    common, kmod = (common_deb, kmod_deb) if package_format == "deb" else (common_rpm, module_rpm)
    return [common(files, out_dir, progress), *(kmod(artifact, out_dir, progress) for artifact in built)]
