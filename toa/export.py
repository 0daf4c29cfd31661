"""Hand the built modules to the engines large fleets already run: Kubernetes KMM and Ansible.

KMM (Kernel Module Management) loads out-of-tree modules from per-kernel "kmod images" that its
`Module` resource maps kernels to. `kmm()` builds one image per module under dist/ with the local
Docker engine (toa.ko under /opt/lib/modules/<release>/, indexed with depmod, on a minimal Debian
base that has the cp, modprobe and sleep KMM's workers run) and writes the `Module` manifest whose
kernelMappings name each built kernel literally. Pushing the images is the user's step.

`ansible()` writes a role that carries the modules and does what `invoke deploy` does on each host
(the same module path, boot files and checks, rollback when the module does not load), with module
options as per-group variables; its tasks are templates/ansible/tasks.yml, its data generated here.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from toa import build, render
from toa.artifacts import Artifact, find_all
from toa.errors import ToaError
from toa.resources import ANSIBLE_TEMPLATES_DIR

KMM_API_VERSION = "kmm.sigs.x-k8s.io/v1beta1"
KMOD_IMAGE_NAME = "toa-kmod"
KMOD_PREFIX = "/opt"  # the Module's default modprobe.dirName
KMOD_BASE_SUITE = "bookworm"
# What KMM's workers run in a kmod image: cp (KMM 2), modprobe and sleep (older KMM); depmod indexes.
KMOD_BASE_TAG = f"toa-kmod-base:debian-{KMOD_BASE_SUITE}"
KUBERNETES_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
LABEL_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_./]{0,252})=([-A-Za-z0-9_.]{0,63})")
LABEL_PREFIX = "io.toa"


@dataclass(frozen=True)
class KmodImage:
    release: str
    reference: str  # registry/path/toa-kmod:tag, what the Module names
    sha256: str  # of the toa.ko inside
    image_id: str


def image_tag(release: str) -> str:
    """A kernel release as an image tag: `+` (6.12.118+deb13-amd64) is not a tag character."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", release)[:128]


def kmod_reference(registry: str, release: str) -> str:
    if not registry or not build.REGISTRY_RE.fullmatch(registry):
        raise ToaError(f"invalid --registry {registry!r}: give the registry the cluster pulls from as "
                       "host[:port][/path], e.g. registry.example.com/kmods")
    return f"{registry.rstrip('/').lower()}/{KMOD_IMAGE_NAME}:{image_tag(release)}"


def _dockerfile(base: str, release: str) -> str:
    return (f"FROM {base}\n"
            f"COPY toa.ko {KMOD_PREFIX}/lib/modules/{release}/toa.ko\n"
            f"RUN depmod -b {KMOD_PREFIX} {release}\n")


def _context(dockerfile: str, artifact: Artifact) -> io.BytesIO:
    """The build context in memory: the Dockerfile and toa.ko, nothing else from this machine."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("toa.ko", artifact.ko.read_bytes())):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _kmod_base(client, progress: Callable[[str], None] | None):
    """A minimal Debian with kmod, built once from toa's debootstrap'd base (its apt sources are the
    mirror it came from)."""
    import docker.errors

    try:
        return client.images.get(KMOD_BASE_TAG)
    except docker.errors.ImageNotFound:
        pass
    base = build.base_image(client, KMOD_BASE_SUITE, progress)
    if progress:
        progress(f"building {KMOD_BASE_TAG}")
    dockerfile = (f"FROM {base.tags[0]}\n"
                  "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kmod "
                  "&& rm -rf /var/lib/apt/lists/*\n")
    try:
        image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=KMOD_BASE_TAG, rm=True,
                                       forcerm=True, pull=False)
    except docker.errors.BuildError as exc:
        raise ToaError(f"building {KMOD_BASE_TAG} failed (it installs kmod from the Debian mirror): {exc.msg}") from None
    return image


def kmod_images(artifacts: list[Artifact], registry: str,
                progress: Callable[[str], None] | None = None) -> list[KmodImage]:
    """One kmod image per artifact in the local engine, tagged for REGISTRY."""
    import docker.errors

    client = build.docker_client()
    base = _kmod_base(client, progress)
    images = []
    for artifact in artifacts:
        reference = kmod_reference(registry, artifact.release)
        sha256 = hashlib.sha256(artifact.ko.read_bytes()).hexdigest()
        if progress:
            progress(f"kmod image {reference}")
        labels = {f"{LABEL_PREFIX}.kernel": artifact.release, f"{LABEL_PREFIX}.sha256": sha256,
                  f"{LABEL_PREFIX}.srcversion": artifact.manifest.get("srcversion", "")}
        try:
            image, _ = client.images.build(fileobj=_context(_dockerfile(base.tags[0], artifact.release), artifact),
                                           custom_context=True, tag=reference, labels=labels, rm=True, forcerm=True,
                                           pull=False, network_mode="none")
        except docker.errors.BuildError as exc:
            raise ToaError(f"building the kmod image of {artifact.release} failed: {exc.msg}") from None
        images.append(KmodImage(artifact.release, reference, sha256, image.id))
    return images


def module_manifest(images: list[KmodImage], *, name: str = "toa", namespace: str = "default",
                    options: dict[str, str] | None = None, selector: dict[str, str] | None = None,
                    sign_secrets: tuple[str, str] | None = None) -> dict:
    """KMM's `Module`: each built kernel mapped by its literal release to its kmod image, loaded with
    OPTIONS; with SIGN_SECRETS (key, certificate) KMM signs each image in the cluster first."""
    for what, value in (("--name", name), ("--namespace", namespace)):
        if not KUBERNETES_NAME_RE.fullmatch(value or ""):
            raise ToaError(f"invalid {what} {value!r}: a Kubernetes name (lower-case letters, digits, '-', "
                           "at most 63)")
    mappings = []
    for image in images:
        mapping = {"literal": image.release, "containerImage": image.reference}
        if sign_secrets:
            # KMM signs UNSIGNED_IMAGE's toa.ko with the secrets and pushes the result as containerImage.
            mapping["containerImage"] = f"{image.reference}-signed"
            mapping["sign"] = {"unsignedImage": image.reference,
                               "keySecret": {"name": sign_secrets[0]}, "certSecret": {"name": sign_secrets[1]},
                               "filesToSign": [f"{KMOD_PREFIX}/lib/modules/{image.release}/toa.ko"]}
        mappings.append(mapping)
    modprobe = {"moduleName": "toa", "dirName": KMOD_PREFIX}
    parameters = render.module_options(options).split()
    if parameters:
        modprobe["parameters"] = parameters
    return {
        "apiVersion": KMM_API_VERSION,
        "kind": "Module",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "moduleLoader": {"container": {"modprobe": modprobe, "kernelMappings": mappings}},
            "selector": selector or {"kubernetes.io/os": "linux"},
        },
    }


def parse_selector(words: list[str] | None) -> dict[str, str] | None:
    """--selector KEY=VALUE flags as a node selector."""
    if not words:
        return None
    selector = {}
    for word in words:
        match = LABEL_RE.fullmatch(word)
        if not match:
            raise ToaError(f"invalid --selector {word[:60]!r}: give a node label as KEY=VALUE, "
                           "e.g. node-role.kubernetes.io/worker=")
        selector[match[1]] = match[2]
    return selector


def image_for(manifest: dict, release: str) -> str | None:
    """The image KMM would load on a node running RELEASE: the first mapping that matches it."""
    for mapping in manifest["spec"]["moduleLoader"]["container"]["kernelMappings"]:
        if mapping.get("literal") == release or (
                "regexp" in mapping and re.fullmatch(mapping["regexp"], release)):
            return mapping["containerImage"]
    return None


def kmm(dist: Path, out_dir: Path, registry: str, *, kernels: list[str] | None = None,
        options: dict[str, str] | None = None, name: str = "toa", namespace: str = "default",
        selector: dict[str, str] | None = None, sign_secrets: tuple[str, str] | None = None,
        progress: Callable[[str], None] | None = None) -> tuple[Path, list[KmodImage]]:
    """Kmod images of the modules under DIST and OUT_DIR/module.yaml mapping kernels to them."""
    kmod_reference(registry, "0")  # a bad registry fails before anything is built
    module_manifest([], name=name, namespace=namespace, options=options)  # so do bad names and options
    images = kmod_images(find_all(Path(dist), kernels), registry, progress)
    manifest = module_manifest(images, name=name, namespace=namespace, options=options, selector=selector,
                               sign_secrets=sign_secrets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "module.yaml"
    header = ("# KMM Module for toa, written by `invoke export kmm`. Push the images it names first:\n"
              + "".join(f"#   docker push {image.reference}\n" for image in images))
    path.write_text(header + yaml.safe_dump(manifest, sort_keys=False))
    return path, images


# ---------------------------------------------------------------- Ansible

ANSIBLE_TEMPLATES = ANSIBLE_TEMPLATES_DIR
# Where the module options go in a boot file the role writes: the role puts the host's own there.
OPTIONS_MARK = "@@toa-options@@"


class _Unsafe(str):
    """Text Ansible must write as it is, never template (`!unsafe`): boot scripts hold `${#...}`."""


def _unsafe_representer(dumper: yaml.SafeDumper, value: _Unsafe):
    return dumper.represent_scalar("!unsafe", str(value), style="|" if "\n" in value else None)


class _RoleDumper(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)  # lists indented under their key, as yamllint wants


_RoleDumper.add_representer(_Unsafe, _unsafe_representer)


@dataclass(frozen=True)
class AnsibleExport:
    role: Path
    playbook: Path
    kernels: list[str]


# the role's copy of the module sources the kernel hooks build from (render.hook_sources), one archive:
# Ansible's copy of a folder takes a round trip or two per file, and there are twenty
HOOK_SOURCES_ARCHIVE = "toa-kmod.tar"


def _autoload(target, release: str, init: str) -> list[dict]:
    """The boot files of `invoke deploy` for one build and init, as the role's data: each file's
    text without options, and split where the host's options go."""
    plain = render.autoload_files(target, release, init=init)
    marked = render.autoload_files(target, release, init=init, options={"kinds": "254"})
    entries = []
    for without, with_options in zip(plain, marked):
        before, mark, after = with_options.content.replace("kinds=254", OPTIONS_MARK, 1).partition(OPTIONS_MARK)
        entry = {"path": without.path, "mode": f"{without.mode:04o}", "kind": without.kind,
                 "plain": _Unsafe(without.content), "options": bool(mark)}
        if mark:
            entry.update(before=_Unsafe(before), after=_Unsafe(after))
        if without.kind == "lines":
            entry["lines"] = [_Unsafe(line) for line in without.content.splitlines()]
        entries.append(entry)
    return entries


def _sources_archive() -> bytes:
    """The module sources as a tar the role unpacks as root: owned by root, 0644 in 0755 folders, each
    dated as the newest source, so that an unchanged tree reads as unchanged on the next run."""
    sources = render.module_source_files()
    mtime = int(max((render.MODULE_SOURCE / relative).stat().st_mtime for relative in sources))
    folders = sorted({parent for relative in sources for parent in relative.parents if parent != Path(".")})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for relative in [*folders, *sources]:
            info = tarfile.TarInfo(relative.as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "root", "root"
            if relative in folders:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                data = (render.MODULE_SOURCE / relative).read_bytes()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ansible(dist: Path, out_dir: Path, *, kernels: list[str] | None = None,
            options: dict[str, str] | None = None,
            progress: Callable[[str], None] | None = None) -> AnsibleExport:
    """OUT_DIR/roles/toa (the modules under DIST and what loads them at boot), a playbook and an
    example inventory; OPTIONS become the role's defaults."""
    from toa import targets
    from toa.deploy.facts import modules_dep_entry

    parameters = render.module_parameters(options)
    artifacts = find_all(Path(dist), kernels)
    out_dir = Path(out_dir)
    role = out_dir / "roles" / "toa"
    builds: dict[str, list[dict]] = {}
    for artifact in artifacts:
        target_id = artifact.manifest.get("target")
        if not target_id:
            raise ToaError(f"{artifact.manifest_path} names no target: rebuild with "
                           f"`invoke build --kernel {artifact.release} --force`")
        target = targets.get(target_id)
        release = artifact.release
        if progress:
            progress(f"role: {target_id} {release}")
        module_path = render.module_path(target, release)
        depmod = modules_dep_entry(module_path, release) is not None
        file = Path(target_id) / release / "toa.ko"
        (role / "files" / file).parent.mkdir(parents=True, exist_ok=True)
        (role / "files" / file).write_bytes(artifact.ko.read_bytes())
        builds.setdefault(release, []).append({
            "target": target_id, "distro": target.distro, "file": str(file), "module_path": module_path,
            "srcversion": artifact.manifest.get("srcversion", ""),
            "sha256": hashlib.sha256(artifact.ko.read_bytes()).hexdigest(),
            "depmod": depmod, "loader": "modprobe toa" if depmod else f"insmod {module_path}",
            # where the kernel hooks (or the build at boot) find the module sources: a kernel installed
            # later gets toa.ko built from them; empty where nothing builds on the host
            "hook_sources": render.hook_source_dir(target) if render.builds_on_host(target) else "",
            "autoload": {init: _autoload(target, release, init) for init in ("systemd", "sysv")},
        })
    for directory in ("tasks", "defaults", "vars"):
        (role / directory).mkdir(parents=True, exist_ok=True)
    (role / "files" / HOOK_SOURCES_ARCHIVE).write_bytes(_sources_archive())
    (role / "tasks" / "main.yml").write_text((ANSIBLE_TEMPLATES / "tasks.yml").read_text())
    defaults = (ANSIBLE_TEMPLATES / "defaults.yml").read_text()
    for name, value in parameters.items():
        defaults = defaults.replace(f'toa_{name}: ""', f"toa_{name}: {json.dumps(value)}")
    (role / "defaults" / "main.yml").write_text(defaults)
    (role / "vars" / "main.yml").write_text(
        "# The modules this role installs, by kernel release: written by `invoke export ansible`.\n"
        "# Boot files' text is kept whole, long lines included.\n# yamllint disable rule:line-length\n---\n"
        + yaml.dump({"toa_builds": builds}, Dumper=_RoleDumper, sort_keys=False, width=1000))
    playbook = out_dir / "playbook.yml"
    playbook.write_text((ANSIBLE_TEMPLATES / "playbook.yml").read_text())
    (out_dir / "inventory.example.ini").write_text((ANSIBLE_TEMPLATES / "inventory.example.ini").read_text())
    return AnsibleExport(role, playbook, sorted(builds))
