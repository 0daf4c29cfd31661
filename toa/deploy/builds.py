"""What a host gets installed: the toa.ko artifact for its kernel and target, and the eBPF engine's
build, each found in dist/ or (with --build-missing) built there, one build at a time; and the
preflight that refuses, before anything is uploaded, a toa.ko the host's kernel would not load.
"""

from __future__ import annotations

import functools
import shlex
import threading
from pathlib import Path

from toa import artifacts, build, engine_bpf, preflight
from toa import kernel as kernels
from toa.artifacts import Artifact
from toa.deploy.facts import Facts
from toa.deploy.host import DeployOptions, Host
from toa.errors import ToaError

_build_lock = threading.Lock()


def _artifact_for(release: str, target_id: str | None, options: DeployOptions, say) -> Artifact | None:
    artifact = artifacts.find(options.dist, release, target_id)
    if artifact is not None or (options.dry_run and options.build_missing):
        return artifact  # a dry run builds nothing: None says a build would come first
    if not options.build_missing:
        raise ToaError(f"no toa.ko built for kernel {release} in {options.dist}: run "
                       f"`invoke build --kernel {release} --out {options.dist}` (or deploy with --build-missing)")

    with _build_lock:  # one build at a time; hosts with the same kernel wait for it and reuse it
        artifact = artifacts.find(options.dist, release, target_id)
        if artifact is None:
            say("build")
            # for the host's own target where it runs this kernel (an HWE kernel's host release), else the kernel's
            known = kernels.classify(release)
            runs_here = target_id if known and any(t.id == target_id for t in known.targets) else None
            build.build_kernel(kernel=release, out_dir=options.dist, distro=runs_here)
            artifact = artifacts.find(options.dist, release, target_id)
    if artifact is None:
        raise ToaError(f"building toa.ko for {release} left no artifact in {options.dist}: check its build.log")
    return artifact


def _bpf_build_for(options: DeployOptions, say) -> engine_bpf.BpfBuild | None:
    """The eBPF engine's build in <dist>/bpf; built there with --build-missing (None: a dry run would)."""
    directory = options.dist / "bpf"
    try:
        return engine_bpf.BpfBuild.from_dir(directory)
    except ToaError:
        if not options.build_missing:
            raise ToaError(f"no eBPF engine built in {directory}: deploy with --build-missing (it builds there with "
                           f"clang and libbpf-dev), or run `invoke verify --engine bpf` (builds into dist/bpf)") from None
        if options.dry_run:
            return None
    with _build_lock:
        say("build")
        return engine_bpf.build(directory)


def dist_symbols(dist: Path) -> tuple[str, ...]:
    """The symbols any toa.ko in DIST imports: what the facts read the preflight's CRCs for, so that
    a host's preflight needs no round trip of its own."""
    modules = sorted((path, path.stat().st_mtime_ns) for path in Path(dist).glob(f"*/*/{artifacts.KO_NAME}"))
    return _symbols_of(tuple(modules))


@functools.lru_cache(maxsize=8)
def _symbols_of(modules: tuple[tuple[Path, int], ...]) -> tuple[str, ...]:
    names: set[str] = set()
    for path, _mtime in modules:
        try:
            names |= set(preflight.read_module(path.read_bytes()).crcs)
        except (OSError, ToaError, ValueError):
            continue  # a damaged file: its own deploy says so (artifacts.find checks it)
    return tuple(sorted(names))


@functools.lru_cache(maxsize=8)
def _module_of(ko: Path, sha256: str) -> preflight.Module:
    """The module's ELF, read once per build for every host that gets it."""
    return preflight.read_module(ko.read_bytes())


def _preflight(host: Host, artifact: Artifact, release: str, facts: Facts) -> None:
    """Refuse, before anything is uploaded, a module the host's kernel would not load: the build's
    preflight checks against what the host has of its kernel's tree (build tree or /boot files), as
    the facts read it (else in a round trip of its own: a module importing symbols they did not ask)."""
    module = _module_of(artifact.ko, artifact.sha256)
    if facts.tree is not None and set(module.crcs) <= set(facts.symbols):
        output = facts.tree
    else:
        script = preflight.host_tree_command(release, list(module.crcs))
        output = host.run_as_user(f"sh -c {shlex.quote(script)}", "preflight")
    tree = host.parse("preflight", lambda text: preflight.parse_host_tree(text, release, host.node.name), output)
    refused = preflight.refusal(preflight.run(module, tree), release)
    if refused:
        raise ToaError(f"{refused}; nothing was uploaded")
