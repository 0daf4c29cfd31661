"""What should change on a host: the steps that take it from its facts to what it should have. Pure.

make_plan for toa.ko (installed, indexed, loaded with the wanted parameters, its autoload files in
place, the eBPF engine detached), make_bpf_plan for the eBPF engine (its loader and unit in place,
toa.ko unloaded and its autoload files taken away), choose_engine between them, and other_kernels:
toa.ko for the kernels that are not running.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass

from toa import detect, engine_bpf, render
from toa.artifacts import Artifact
from toa.deploy.facts import (
    _STAGING_NAME, BPF_CONFIG, MODULE_TEMP_MARK, TEMP_SUFFIX_CHARS, BpfState, Current, ModuleState, _temp_prefix,
    modules_dep_entry)
from toa.errors import ToaError
from toa.render import AutoloadFile

# What the module loads with when no options are given (toa/module/toa.c); a loaded module showing
# anything else in /sys/module/toa/parameters is reloaded.
DEFAULT_PARAMETERS = {"kinds": "254,253", "trusted": ""}


# ---------------------------------------------------------------- the engine: the eBPF one where the host can run it


ENGINES = ("auto", "bpf", "module")
BPF_MIN_KERNEL = (5, 10)


def kernel_version(release: str) -> tuple[int, int] | None:
    match = re.match(r"([0-9]+)\.([0-9]+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def bpf_refusal(platform: detect.Platform, bpf: BpfState) -> str | None:
    """Why this host cannot run the eBPF engine, or None if it can. Pure."""
    version = kernel_version(platform.kernel or "")
    if version is None or version < BPF_MIN_KERNEL:
        return f"kernel {platform.kernel} is older than 5.10"
    if platform.init != "systemd":
        return f"the host boots {platform.init}, not systemd (the engine is attached at boot by {render.BPF_UNIT_NAME})"
    for name in BPF_CONFIG:
        if bpf.config.get(name, "y") != "y":
            return f"the kernel is built without {name}"
    if not bpf.config and not bpf.bpf_syscall:
        return "the kernel has no bpf() system call (CONFIG_BPF_SYSCALL)"
    if not bpf.cgroup2:
        return "the kernel has no cgroup2"
    return None


def choose_engine(platform: detect.Platform, bpf: BpfState, wanted: str) -> tuple[str, str]:
    """(engine, why) for WANTED (auto, bpf or module). Pure; an explicit bpf the host cannot run is a ToaError."""
    if wanted not in ENGINES:
        raise ToaError(f"--engine must be one of {', '.join(ENGINES)}, not {wanted!r}")
    if wanted == "module":
        return "module", "asked for"
    refused = bpf_refusal(platform, bpf)
    if wanted == "bpf":
        if refused:
            raise ToaError(f"the eBPF engine needs {engine_bpf.KERNEL_NEEDS} and systemd: {refused}; "
                           "deploy the module to this host (--engine module or auto)")
        return "bpf", "asked for"
    if refused:
        return "module", f"auto: {refused}"
    return "bpf", "auto: kernel 5.10+ with BPF, cgroup-bpf and cgroup2"


def same_parameters(shown: dict[str, str], wanted: dict[str, str]) -> bool:
    """Whether the engine SHOWS the WANTED kinds and trusted list; networks compared as networks. Pure."""
    def networks(text: str) -> list:
        try:
            return [ipaddress.ip_network(word, strict=False) for word in text.split(",") if word]
        except ValueError:
            return [text]
    return (shown.get("kinds", "") == wanted.get("kinds", "")
            and networks(shown.get("trusted", "")) == networks(wanted.get("trusted", "")))


# ---------------------------------------------------------------- the plan: wanted against actual


@dataclass(frozen=True)
class FileChange:
    entry: AutoloadFile
    text: str | None  # the wanted text (for a symlink, its target); None: remove the file
    previous: Current | None  # what to put back on rollback (None: remove)

    def describe(self) -> str:
        return f"{'remove' if self.text is None else 'write'} {self.entry.path}"


@dataclass(frozen=True)
class Plan:
    stale: tuple[str, ...] = ()
    install: bool = False
    depmod: bool = False
    load: str | None = None  # "load" or "reload"
    files: tuple[FileChange, ...] = ()
    detach_bpf: bool = False  # the eBPF engine is attached: detached before toa.ko loads (one engine at a time)

    @property
    def empty(self) -> bool:
        return not (self.stale or self.install or self.depmod or self.load or self.files or self.detach_bpf)

    def describe(self, artifact: Artifact) -> list[str]:
        steps = []
        if self.stale:
            steps.append(f"remove {len(self.stale)} temp file(s) of an interrupted run")
        if self.install:
            steps.append(f"install {artifact.ko} (srcversion {artifact.srcversion})")
        if self.depmod:
            steps.append("depmod")
        if self.detach_bpf:
            steps.append("detach the eBPF engine")
        if self.load:
            steps.append(f"{self.load} toa")
        steps += [change.describe() for change in self.files]
        return steps


def wanted_parameters(options: dict[str, str] | None) -> dict[str, str]:
    """The parameters the loaded module should show in /sys/module/toa/parameters."""
    return {**DEFAULT_PARAMETERS, **render.module_parameters(options)}


def parameters_differ(shown: dict[str, str], wanted: dict[str, str]) -> dict[str, str]:
    """The WANTED parameters the module does not SHOW; one it lacks counts as empty (its default)."""
    return {name: value for name, value in wanted.items() if shown.get(name, "") != value}


def wanted_text(entry: AutoloadFile, current: Current | None) -> str:
    if entry.kind == "lines":
        return entry.merge(current.text if current and current.kind == "file" else None)
    return entry.content


def _require_read(state: ModuleState, entry: AutoloadFile) -> None:
    """A plan needs what the host has at ENTRY's path: one the facts did not read is an error, not absent."""
    if entry.path in state.unread:
        raise ToaError(f"the facts did not read {entry.path}, which this host's autoload needs: please report it")


def _file_changes(state: ModuleState, files: list[AutoloadFile]) -> list[FileChange]:
    """What to write so that FILES are in place on a host in STATE. Pure."""
    changes = []
    for entry in files:
        _require_read(state, entry)
        current = state.files.get(entry.path)
        text = wanted_text(entry, current)
        kind = "symlink" if entry.kind == "symlink" else "file"
        mode_differs = entry.kind == "file" and current is not None and current.mode != entry.mode
        if current is None or current.kind != kind or current.text != text or mode_differs:
            changes.append(FileChange(entry, text, current))
    return changes


def _removals(state: ModuleState, files: list[AutoloadFile]) -> list[FileChange]:
    """What to remove (toa's lines: take out of a shared file) so that none of FILES starts an engine. Pure."""
    changes = []
    for entry in files:
        _require_read(state, entry)
        current = state.files.get(entry.path)
        if current is None:
            continue
        if entry.kind == "lines":
            text = entry.unmerge(current.text) if current.kind == "file" else current.text
            if text != current.text:
                changes.append(FileChange(entry, text, current))
        else:
            changes.append(FileChange(entry, None, current))
    return changes


def _module_boot_files(files: list[AutoloadFile]) -> list[AutoloadFile]:
    """The module's autoload files a switch to the eBPF engine takes away: all but SUSE's
    allow_unsupported_modules file (a system setting that loads nothing)."""
    return [entry for entry in files if "unsupported-modules" not in entry.path]


def make_plan(state: ModuleState, artifact: Artifact, files: list[AutoloadFile], module_file: str,
              options: dict[str, str] | None, bpf_files: list[AutoloadFile] = ()) -> Plan:
    """The steps that take a host from STATE to ARTIFACT loaded with OPTIONS and FILES in place,
    and the eBPF engine (BPF_FILES start it at boot) detached and disabled. Pure."""
    install = state.installed_sha256 != artifact.sha256
    depmod = modules_dep_entry(module_file, artifact.release) is not None and (install or not state.indexed)
    if not state.loaded:
        load = "load"
    # srcversion hashes the sources only, so builds for two kernels share it: a replaced file is
    # always reloaded, so that what runs is what is installed
    elif install or state.loaded_srcversion != artifact.srcversion or parameters_differ(
        state.parameters, wanted_parameters(options)
    ):
        load = "reload"
    else:
        load = None
    changes = _file_changes(state, files) + _removals(state, list(bpf_files))
    prefixes = [_temp_prefix(path, MODULE_TEMP_MARK) for path in (module_file, state.module_resolved) if path]
    return Plan(_own_stale(state, prefixes, files), install, depmod, load, tuple(changes),
                detach_bpf=state.bpf.active)


def _own_stale(state: ModuleState, prefixes: list[str], files: list[AutoloadFile]) -> tuple[str, ...]:
    """The temp names in STATE that this code makes: PREFIXES, or beside FILES (or where they point)."""
    # only names toa makes: the host's answer never decides what gets deleted (a resolved path only
    # says in which directory such a name is looked for)
    prefixes = prefixes + [_temp_prefix(path) for entry in files
                           for path in (entry.path, state.resolved.get(entry.path), posixpath.dirname(entry.path))
                           if path]
    made_here = re.compile("(?:" + "|".join(map(re.escape, prefixes)) + f")[0-9a-f]{{{TEMP_SUFFIX_CHARS}}}")
    return tuple(path for path in state.stale if made_here.fullmatch(path) or _STAGING_NAME.fullmatch(path))


@dataclass(frozen=True)
class BpfPlan:
    """The eBPF engine's steps: its loader and unit in place, the module unloaded and its autoload
    files taken away, the engine attached (or its options set) as wanted."""

    stale: tuple[str, ...] = ()
    install: bool = False  # the loader
    files: tuple[FileChange, ...] = ()  # the unit and its link written, the module's files removed
    unload_module: bool = False
    attach: str | None = None  # "attach", "reattach" (another object, or attached outside the unit) or "set"

    @property
    def empty(self) -> bool:
        return not (self.stale or self.install or self.files or self.unload_module or self.attach)

    @property
    def units_changed(self) -> bool:
        return any(change.entry.path.startswith("/etc/systemd/") for change in self.files)

    def describe(self, built: engine_bpf.BpfBuild) -> list[str]:
        steps = []
        if self.stale:
            steps.append(f"remove {len(self.stale)} temp file(s) of an interrupted run")
        if self.install:
            steps.append(f"install {render.BPF_LOADER} (object sha256 {built.object_sha256[:16]})")
        steps += [change.describe() for change in self.files]
        if self.unload_module:
            steps.append("unload toa.ko")
        if self.attach:
            steps.append({"attach": "attach the eBPF engine", "reattach": "attach the eBPF engine again",
                          "set": "set the eBPF engine's options"}[self.attach])
        return steps


def make_bpf_plan(state: ModuleState, loader_sha256: str, bpf_files: list[AutoloadFile],
                  module_files: list[AutoloadFile], options: dict[str, str] | None) -> BpfPlan:
    """The steps that take a host from STATE to the eBPF engine (whose loader has LOADER_SHA256)
    attached with OPTIONS at every boot, and no toa.ko loaded or loaded at boot. Pure."""
    bpf = state.bpf
    install = bpf.loader_sha256 != loader_sha256
    files = _file_changes(state, bpf_files) + _removals(state, _module_boot_files(module_files))
    if not bpf.active:
        attach = "attach"
    # a new loader carries a new object; an engine attached by hand is handed to the unit, so that
    # systemd's view (and its ExecStop) is the engine's
    elif install or not bpf.attached or not bpf.unit_active:
        attach = "reattach"
    elif not same_parameters(bpf.parameters, wanted_parameters(options)):
        attach = "set"
    else:
        attach = None
    stale = _own_stale(state, [_temp_prefix(render.BPF_LOADER)], bpf_files)
    return BpfPlan(stale, install, tuple(files), state.loaded, attach)


# ---------------------------------------------------------------- the other kernels: the next boot's, the installed


@dataclass(frozen=True)
class OtherKernel:
    """toa.ko to install for a kernel that is not running (installed and indexed, not loaded)."""

    release: str
    why: str  # "next boot", "installed"
    artifact: Artifact
    module_file: str
    replaces: str | None  # sha256 of the file it replaces, or None

    def describe(self) -> str:
        return f"install toa.ko for {self.release} ({self.why})"


KERNEL_CHOICES = ("running", "next", "installed")


def other_kernels(platform: detect.Platform, kernels: tuple[str, ...]) -> dict[str, str]:
    """The kernels besides the running one that KERNELS asks toa.ko for: release -> why. Pure."""
    wanted = {}
    if "installed" in kernels:
        wanted.update({release: "installed" for release in platform.installed_kernels})
    if "next" in kernels and platform.next_kernel:
        wanted[platform.next_kernel] = "next boot"
    wanted.pop(platform.kernel, None)
    return wanted
