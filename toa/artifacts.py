"""What the builds leave in dist/: its layout, the manifests, their verification, and the lookup.

One kernel's build lives in <dist>/<target>/<release>/: toa.ko, build.log and manifest.json (what the
build read from the module and how it was built; `invoke sign` adds the signature). Build writes
artifacts here; deploy, status, package, sign and export find them here and nowhere else.

The eBPF engine (one build for every kernel) lives in <dist>/bpf/: toa.bpf.o, the toa-bpf loader that
embeds it, and manifest.json (each file's sha256, the sources' hash and the tools' versions).
toa.engine_bpf builds it; lab, deploy and package read it here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from toa.errors import ToaError
from toa.kernel import validate_release

KO_NAME = "toa.ko"
MANIFEST_NAME = "manifest.json"
LOG_NAME = "build.log"
DEFAULT_DIST = Path("dist")
BPF_DIR_NAME = "bpf"
BPF_OBJECT_NAME = "toa.bpf.o"
BPF_LOADER_NAME = "toa-bpf"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SRCVERSION_RE = re.compile(r"[0-9A-F]{1,64}")


@dataclass(frozen=True)
class Artifact:
    """A toa.ko in dist/ with the manifest its build wrote beside it."""

    ko: Path
    manifest: dict = field(compare=False)

    @property
    def manifest_path(self) -> Path:
        return self.ko.with_name(MANIFEST_NAME)

    @property
    def release(self) -> str:
        return self.manifest["kernel_release"]

    @property
    def target(self) -> str | None:
        return self.manifest.get("target")

    @property
    def sha256(self) -> str:
        return self.manifest.get("sha256") or ""

    @property
    def srcversion(self) -> str:
        return self.manifest.get("srcversion") or ""

    @property
    def vermagic(self) -> str:
        return self.manifest.get("vermagic") or ""

    def _rebuild(self, why: str) -> ToaError:
        return ToaError(f"{why}: rebuild with `invoke build --kernel {self.release} --force`")

    def verify(self) -> Artifact:
        """Check that toa.ko is the file the manifest describes (its sha256) and that the manifest names a
        srcversion; a damaged or half-copied artifact is one ToaError saying how to rebuild it."""
        if not SHA256_RE.fullmatch(self.sha256) or not SRCVERSION_RE.fullmatch(self.srcversion):
            raise self._rebuild(f"{self.manifest_path} does not describe a toa.ko for {self.release} "
                                "(no sha256 or srcversion)")
        try:
            data = self.ko.read_bytes()
        except OSError as exc:
            raise self._rebuild(f"{self.ko} is unreadable ({exc.strerror or exc})") from None
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise self._rebuild(f"{self.ko} does not match the sha256 in its manifest")
        return self

    def verify_module(self, data: bytes | None = None) -> Artifact:
        """Check the module itself (pyelftools) against the manifest: its vermagic is the manifest's and
        names this kernel, its srcversion is the manifest's. DATA: the module's bytes, if not the file's."""
        from toa.ko import modinfo

        info = modinfo(self.ko.read_bytes() if data is None else data)
        vermagic = info.get("vermagic", "")
        if vermagic.split(" ", 1)[0] != self.release or vermagic.strip() != self.vermagic.strip():
            raise self._rebuild(f"{self.ko} has vermagic {vermagic.strip()!r}, its manifest "
                                f"{self.vermagic.strip()!r} for {self.release}")
        if info.get("srcversion", "") != self.srcversion:
            raise self._rebuild(f"{self.ko} has srcversion {info.get('srcversion') or 'none'}, its manifest "
                                f"{self.srcversion or 'none'}")
        return self


def directory(dist: Path, target_id: str, release: str) -> Path:
    """Where one kernel's toa.ko, manifest.json and build.log go: <dist>/<target>/<release>/."""
    return Path(dist) / target_id / validate_release(release)


def load(folder: Path, release: str) -> Artifact:
    """The artifact in FOLDER, whose manifest must describe a build for RELEASE."""
    ko, manifest_path = Path(folder) / KO_NAME, Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ToaError(f"{manifest_path} is unreadable ({exc}): rebuild with "
                       f"`invoke build --kernel {release} --force`") from None
    if not isinstance(manifest, dict) or manifest.get("kernel_release") != release:
        raise ToaError(f"{manifest_path} does not describe a build for {release}: rebuild with "
                       f"`invoke build --kernel {release} --force`")
    return Artifact(ko, manifest)


def find(dist: Path, release: str, target_id: str | None = None) -> Artifact | None:
    """The build for exactly RELEASE under DIST, TARGET_ID's where several targets built the same release,
    else the newest, verified (its sha256); None if there is none."""
    validate_release(release)  # also keeps glob characters out of the pattern
    found = [m.parent for m in Path(dist).glob(f"*/{release}/{MANIFEST_NAME}") if (m.parent / KO_NAME).is_file()]
    folder = max(found, key=lambda d: (d.parent.name == target_id, (d / MANIFEST_NAME).stat().st_mtime),
                 default=None)
    if folder is None:
        return None
    return load(folder, release).verify()


def find_all(dist: Path, kernels: list[str] | None = None) -> list[Artifact]:
    """The verified builds under DIST, one per kernel release: those for KERNELS, or all of them (by
    release); one ToaError naming what is missing and how to build it."""
    dist = Path(dist)
    releases = ([validate_release(kernel) for kernel in kernels] if kernels
                else sorted({path.parent.name for path in dist.glob(f"*/*/{MANIFEST_NAME}")}))
    if not releases:
        raise ToaError(f"no built toa.ko under {dist}/: run `invoke build --kernel RELEASE` first")
    artifacts = []
    for release in releases:
        artifact = find(dist, release)
        if artifact is None:
            raise ToaError(f"no toa.ko for {release} under {dist}/: run `invoke build --kernel {release}` first")
        artifacts.append(artifact)
    return artifacts


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Written beside, then renamed: dist never holds a half-written file under its final name."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as temporary:
        temporary.write(data)
    os.chmod(temporary.name, mode)
    os.replace(temporary.name, path)


def write(folder: Path, module: bytes, manifest: dict) -> Artifact:
    """Put MODULE and MANIFEST (its sha256 and size filled in) in FOLDER: toa.ko first, then the
    manifest that describes it, each whole. Returns the artifact."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "sha256": hashlib.sha256(module).hexdigest(), "size": len(module)}
    _write_atomically(folder / KO_NAME, module)
    _write_atomically(folder / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return Artifact(folder / KO_NAME, manifest)


def up_to_date(folder: Path, release: str, source_hash: str, build_id: str) -> bool:
    """True when FOLDER already holds toa.ko built from these sources for RELEASE by this build
    environment, whole (its sha256 is the manifest's)."""
    try:
        artifact = load(folder, release).verify()
    except ToaError:
        return False
    manifest = artifact.manifest
    return manifest.get("source_hash") == source_hash and (manifest.get("build_image") or {}).get("id") == build_id


# ---------------------------------------------------------------- the eBPF engine: <dist>/bpf/


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bpf_directory(dist: Path = DEFAULT_DIST) -> Path:
    """Where the eBPF engine's object, loader and manifest go: <dist>/bpf/."""
    return Path(dist) / BPF_DIR_NAME


@dataclass(frozen=True)
class BpfArtifact:
    """The built eBPF engine: the object, the loader that embeds it, and their manifest."""

    object: Path
    loader: Path
    manifest: Path
    object_sha256: str
    skipped: bool = False  # an identical build was already there

    @classmethod
    def from_dir(cls, directory: Path) -> BpfArtifact:
        """The build in DIRECTORY (<dist>/bpf), checked against its manifest (each file's sha256)."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            raise ToaError(f"no BPF engine build in {directory} (no readable manifest.json): run `invoke verify "
                           "--engine bpf` or toa.engine_bpf.build() first") from None
        built = cls(directory / BPF_OBJECT_NAME, directory / BPF_LOADER_NAME, manifest_path,
                    manifest.get("object", {}).get("sha256", ""))
        for path, entry in ((built.object, "object"), (built.loader, "loader")):
            if not path.is_file() or sha256(path) != manifest.get(entry, {}).get("sha256"):
                raise ToaError(f"{path} is missing or differs from {manifest_path}: rebuild the BPF engine")
        return built

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())


def bpf_up_to_date(directory: Path, source_hash: str, toolchain: dict[str, str]) -> BpfArtifact | None:
    """The whole build in DIRECTORY when these sources and tools made it (marked skipped), else None."""
    try:
        built = BpfArtifact.from_dir(directory)
        manifest = built.read_manifest()
    except (ToaError, ValueError):
        return None
    if manifest.get("source_hash") == source_hash and manifest.get("toolchain") == toolchain:
        return dataclasses.replace(built, skipped=True)
    return None


def write_bpf(directory: Path, object_file: Path, loader_file: Path, manifest: dict) -> BpfArtifact:
    """Copy OBJECT_FILE and LOADER_FILE (executable) into DIRECTORY under their names, then write MANIFEST
    with each file's sha256 filled in, last: a manifest only ever describes files that are whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    object_bytes, loader_bytes = Path(object_file).read_bytes(), Path(loader_file).read_bytes()
    object_sha256 = hashlib.sha256(object_bytes).hexdigest()
    manifest = {**manifest,
                "object": {**manifest.get("object", {}), "file": BPF_OBJECT_NAME, "sha256": object_sha256},
                "loader": {**manifest.get("loader", {}), "file": BPF_LOADER_NAME,
                           "sha256": hashlib.sha256(loader_bytes).hexdigest()}}
    _write_atomically(directory / BPF_OBJECT_NAME, object_bytes)
    _write_atomically(directory / BPF_LOADER_NAME, loader_bytes, 0o755)
    _write_atomically(directory / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return BpfArtifact(directory / BPF_OBJECT_NAME, directory / BPF_LOADER_NAME, directory / MANIFEST_NAME,
                       object_sha256)
