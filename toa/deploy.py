"""Roll toa.ko (or the eBPF engine) out to hosts over SSH and keep it running across reboots.

Shaped like pyinfra: a *fact* is one shell command whose output a pure function parses (tested
offline on recorded output); the *plan* compares what a host has with what it should have and lists
only the steps that close the gap, so a second run finds nothing to do and says so.

Per host: detect the platform and `uname -r`, pick the artifact built for that exact release, read
the module state (one command), plan, then apply with rollback:

1. upload toa.ko to a private staging directory (mktemp -d under /tmp) and check its sha256 there;
2. put it in place as every file is (see below), the current toa.ko hard-linked to toa.ko.prev
   just before the rename; depmod -a;
3. load it (rmmod first when another build or other options are loaded) and verify: the kernel log
   after a marker written to /dev/kmsg says `TOA: toa loaded`, /sys/module/toa exists and its
   srcversion is the artifact's;
4. write the autoload files from toa.render.

Every file deploy writes (toa.ko, autoload files, shared files like /etc/modules merged, and the
rollback's restores) goes through one script (_replace_script): a symlinked path is written where it
points (readlink -f on the host); the new content goes to a temp name beside that target
(`.<name>.toa-new-<random>`, toa.ko's `.toa.ko.new-<random>`), whose sha256 must equal the one
computed here before anything else happens; the temp takes the target's owner and SELinux label (and
mode, for a shared file; a file toa owns gets its own mode); then sync, rename over the target, sync.
Any failing step (a full disk included) fails the host, and the temp name is removed. A power cut
leaves each file old or new and whole; the only leftovers it can leave are temp names, which depmod
ignores (they do not end in .ko) and the next run deletes; the staging directory is a plain upload
under /tmp. Any failure rolls back: the previous toa.ko and autoload files are put back, depmod runs
again, and the previously loaded build is loaded again the way the host loads it (modprobe, or
insmod of its file where it lives outside /lib/modules) or none stays loaded if none was.

The eBPF engine (--engine bpf, or auto where the host can run it: choose_engine) goes the same way
with its own plan (make_bpf_plan): the static loader installed like toa.ko, toa-bpf.service and its
wants link written like the autoload files, the module's autoload files removed and toa.ko unloaded,
then the unit started and `toa-bpf status` checked. Its facts come in the state command's round trip.
One engine at a time: each plan takes the other engine away before its own starts, and a rollback
stops the engine this run started before it brings back the one the host had.

Every remote command and transfer has a time limit (DeployOptions.command_timeout); connecting has
SshOptions.timeout. A host that stops answering fails with the step it was at, and the rollback
then reconnects once (with the connect timeout) rather than running apply and rollback as one
detached script on the host: each step is checked from here (its output parsed, its file's sha256
compared), which a script left running on a vanished host could not report, and a host that comes
back without a rollback still holds only whole files that the next run completes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import posixpath
import re
import secrets
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import paramiko

from toa import artifacts, build, detect, engine_bpf, preflight, remote, render
from toa.artifacts import Artifact
from toa import kernel as kernels
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.nodes import Node
from toa.render import AutoloadFile

# What the module loads with when no options are given (toa/module/toa.c); a loaded module showing
# anything else in /sys/module/toa/parameters is reloaded.
DEFAULT_PARAMETERS = {"kinds": "254,253", "trusted": ""}
LOADED_MESSAGE = "TOA: toa loaded"
# modprobe's words when the kernel refuses an unsigned or untrusted module (Secure Boot, module.sig_enforce=1).
KEY_REJECTED = "Key was rejected by service"
MODULE_TEMP_MARK = ".new-"
MODULE_TEMP_PREFIX = f".toa.ko{MODULE_TEMP_MARK}"  # toa.ko's temp names: .toa.ko.new-<random>
FILE_TEMP_MARK = ".toa-new-"  # every other file's: .<name>.toa-new-<random>
TEMP_SUFFIX_CHARS = 8  # hex digits after a temp name's prefix
STAGING_PREFIX = "/tmp/toa-deploy."
# Seconds a command or transfer on a host may take (DeployOptions.command_timeout's default), and the
# connect timeout of the one reconnect a rollback makes after the connection was lost.
COMMAND_TIMEOUT_SECONDS = 120.0
RECONNECT_SECONDS = 15.0
PATH_SETTING = "PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH"
_SHA256, _SRCVERSION = artifacts.SHA256_RE, artifacts.SRCVERSION_RE
_MODE = re.compile(r"[0-7]{1,4}")

Progress = Callable[[str, str], None]  # (host, step)


# ---------------------------------------------------------------- facts: the module state of a host


@dataclass(frozen=True)
class Current:
    """An autoload path as found on the host."""

    kind: str  # "file" or "symlink"
    text: str  # the file's text or the link's target
    mode: int = 0o644


@dataclass
class ModuleState:
    loaded: bool = False
    loaded_srcversion: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    installed_sha256: str | None = None
    installed_srcversion: str | None = None
    indexed: bool = False  # modules.dep lists the installed file
    stale: list[str] = field(default_factory=list)  # temp names a cut-short run left
    files: dict[str, Current | None] = field(default_factory=dict)
    # where a symlinked toa.ko or file (of kind file or lines) really is: its temp names live there
    module_resolved: str | None = None
    resolved: dict[str, str] = field(default_factory=dict)
    # other installed kernels: release -> (sha256 of toa's own file there, or None; a toa.ko found, or None)
    others: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    bpf: BpfState = field(default_factory=lambda: BpfState())  # the eBPF engine's facts (bpf_state_command)


def modules_dep_entry(module_file: str, release: str) -> str | None:
    """The module's path as modules.dep lists it, or None where it lives outside /lib/modules
    (loaded by path, depmod does not apply)."""
    base = f"/lib/modules/{release}/"
    return module_file[len(base):] if module_file.startswith(base) else None


def _temp_suffix() -> str:
    return secrets.token_hex(TEMP_SUFFIX_CHARS // 2)


def _temp_prefix(path: str, mark: str = FILE_TEMP_MARK) -> str:
    """What the temp names of PATH start with: .<name><mark> beside it."""
    directory, name = posixpath.split(path)
    return f"{directory}/.{name}{mark}"


def state_command(module_file: str, release: str, files: list[AutoloadFile],
                  others: tuple[tuple[str, str], ...] = ()) -> str:
    """One command that prints a host's module state as @@-tagged lines (see parse_state); OTHERS:
    (release, module file) of the other kernels whose toa.ko is wanted too."""
    q = shlex.quote
    entry = modules_dep_entry(module_file, release)
    lines = [
        PATH_SETTING,
        f"m={q(module_file)}",
        'if [ -d /sys/module/toa ]; then echo "@@loaded $(cat /sys/module/toa/srcversion 2>/dev/null)"; fi',
        'for p in /sys/module/toa/parameters/*; do [ -r "$p" ] && echo "@@parameter ${p##*/} $(cat "$p")"; done',
        'if [ -f "$m" ]; then echo "@@installed $(sha256sum < "$m" | cut -d" " -f1) '
        '$(modinfo -F srcversion "$m" 2>/dev/null)"; fi',
    ]
    if entry is not None:
        lines.append(f"grep -qs {q('^' + re.escape(entry) + ':')} {q(f'/lib/modules/{release}/modules.dep')} "
                     "&& echo @@indexed")
    # temp names beside each path and, for a symlink written where it points, beside its target
    # (globs: the quoted fixed part, then an unquoted *)
    written = [("m", module_file, MODULE_TEMP_MARK)] + [
        (str(index), f.path, FILE_TEMP_MARK) for index, f in enumerate(files) if f.kind != "symlink"]
    for key, path, mark in written:
        lines.append(
            f'f={q(path)}; r=$(readlink -f -- "$f" 2>/dev/null) || r=$f; '
            f'if [ "$r" != "$f" ]; then echo "@@resolved {key} $(printf %s "$r" | base64 -w0)"; fi; '
            f'for t in {q(_temp_prefix(path, mark))}* "$(dirname -- "$r")/.$(basename -- "$r")"{q(mark)}*; do '
            'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')
    for f in files:
        if f.kind == "symlink":
            lines.append(f"for t in {q(_temp_prefix(f.path))}*; do "
                         'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')
    for index, entry_file in enumerate(files):
        if entry_file.kind == "symlink":
            lines.append(
                f"f={q(entry_file.path)}; "
                f'if [ -L "$f" ]; then echo "@@symlink {index} $(printf %s "$(readlink "$f")" | base64 -w0)"; '
                f'elif [ -f "$f" ]; then echo "@@file {index} $(stat -c %a "$f") $(base64 -w0 < "$f")"; '
                f'else echo "@@absent {index}"; fi')
        else:  # read through a symlink: the file it points to is the one deploy edits
            lines.append(
                f"f={q(entry_file.path)}; "
                f'if [ -f "$f" ]; then echo "@@file {index} $(stat -L -c %a "$f") $(base64 -w0 < "$f")"; '
                f'else echo "@@absent {index}"; fi')
    for other, other_file in others:
        # toa's own file, else any toa.ko that kernel has (a DKMS or kmod package's)
        lines.append(
            f"f={q(other_file)}; if [ -f \"$f\" ]; then echo \"@@other {q(validate_release(other))} "
            f'$(sha256sum < "$f" | cut -d" " -f1) $f"; else p=$(find {q(f"/lib/modules/{other}")} '
            f"-name 'toa.ko*' 2>/dev/null | head -n 1); echo \"@@other {q(other)} - ${{p:--}}\"; fi")
    return "\n".join(lines) + "\ntrue\n"


def _unbase64(text: str, what: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ToaError(f"{what} is not base64 of text") from None


def parse_state(output: str, files: list[AutoloadFile]) -> ModuleState:
    """Parse state_command's output. Pure. Lines without a tag (a login banner, ...) are ignored; a
    tagged line that is not what state_command prints is a ToaError."""
    state = ModuleState(files={f.path: None for f in files})

    def entry(word: str) -> AutoloadFile:
        if not word.isdigit() or int(word) >= len(files):
            raise ToaError(f"no autoload file number {word[:20]!r}")
        return files[int(word)]

    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if not tag.startswith("@@"):
            continue
        words = rest.split()
        try:
            _parse_state_line(state, tag, rest, words, entry)
        except (ToaError, IndexError) as exc:
            detail = f": {exc}" if isinstance(exc, ToaError) else ""
            raise ToaError(f"unexpected line {line[:100]!r} in the module state{detail}") from None
    state.stale = list(dict.fromkeys(state.stale))  # a path and its target in one directory: one glob twice
    return state


def _parse_state_line(state: ModuleState, tag: str, rest: str, words: list[str], entry) -> None:
    if tag.startswith("@@bpf"):
        _parse_bpf_line(state.bpf, tag, rest, words)
    elif tag == "@@loaded":
        srcversion = rest.strip()
        if srcversion and not _SRCVERSION.fullmatch(srcversion):
            raise ToaError("not a srcversion")
        state.loaded, state.loaded_srcversion = True, srcversion or None
    elif tag == "@@parameter" and words:
        state.parameters[words[0]] = " ".join(words[1:])
    elif tag == "@@installed" and words and _SHA256.fullmatch(words[0]) and len(words) <= 2:
        if len(words) == 2 and not _SRCVERSION.fullmatch(words[1]):
            raise ToaError("not a srcversion")
        state.installed_sha256 = words[0]
        state.installed_srcversion = words[1] if len(words) > 1 else None
    elif tag == "@@indexed" and not words:
        state.indexed = True
    elif tag == "@@stale" and rest:
        state.stale.append(rest)
    elif tag == "@@resolved" and len(words) == 2:
        path = _unbase64(words[1], "the resolved path")
        if not path.startswith("/") or posixpath.normpath(path) != path or "\n" in path:
            raise ToaError("not an absolute path")
        if words[0] == "m":
            state.module_resolved = path
        else:
            state.resolved[entry(words[0]).path] = path
    elif tag == "@@symlink" and len(words) in (1, 2):
        target = _unbase64(words[1] if len(words) > 1 else "", "the link")
        state.files[entry(words[0]).path] = Current("symlink", target)
    elif tag == "@@file" and len(words) in (2, 3) and _MODE.fullmatch(words[1]):
        text = _unbase64(words[2] if len(words) > 2 else "", "the file")
        state.files[entry(words[0]).path] = Current("file", text, int(words[1], 8))
    elif tag == "@@absent" and len(words) == 1:
        state.files[entry(words[0]).path] = None
    elif tag == "@@other" and len(words) == 3 and (words[1] == "-" or _SHA256.fullmatch(words[1])):
        if words[2] != "-" and not words[2].startswith("/"):
            raise ToaError("not an absolute path")
        state.others[validate_release(words[0])] = (None if words[1] == "-" else words[1],
                                                    None if words[2] == "-" else words[2])
    else:
        raise ToaError("not a line the state command prints")


# ---------------------------------------------------------------- facts: the eBPF engine of a host

ENGINES = ("auto", "bpf", "module")
BPF_MIN_KERNEL = (5, 10)
BPF_CONFIG = ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF")
BPF_PIN_DIR = "/sys/fs/bpf/toa"
BPF_PROGRAMS = 3  # links toa-bpf status lists: the sock_ops program and the two getpeername ones
_CONFIG_LINE = re.compile(r"(CONFIG_[A-Z0-9_]+)=(y|m|n)")
_KINDS = re.compile(r"[0-9]{1,3}(,[0-9]{1,3})*")


@dataclass
class BpfState:
    """The eBPF engine on a host, as bpf_state_command prints it."""

    loader_sha256: str | None = None  # toa's loader at render.BPF_LOADER
    pinned: bool = False  # /sys/fs/bpf/toa exists: an engine is attached, whichever loader did it
    attached: bool = False  # the loader's status says so
    object_sha256: str | None = None  # the object the installed loader embeds
    links: int = 0  # attached links with a program
    parameters: dict[str, str] = field(default_factory=dict)  # kinds, trusted as the engine shows them
    unit_active: bool = False
    config: dict[str, str] = field(default_factory=dict)  # CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF, if told
    bpf_syscall: bool = False  # /proc/sys/kernel/unprivileged_bpf_disabled exists only with CONFIG_BPF_SYSCALL
    cgroup2: bool = False  # the kernel knows cgroup2 (/proc/filesystems)

    @property
    def active(self) -> bool:
        return self.pinned or self.attached


def bpf_state_command(loader: str = render.BPF_LOADER) -> str:
    """Lines for the state command that print the eBPF engine's facts as @@bpf... lines (and the
    loader's temp names as @@stale); see _parse_bpf_line."""
    q = shlex.quote
    configs = "|".join(BPF_CONFIG)
    return "\n".join([
        f"l={q(loader)}",
        'if [ -f "$l" ]; then echo "@@bpfloader $(sha256sum < "$l" | cut -d" " -f1)"; '
        '[ -x "$l" ] && "$l" status 2>/dev/null | sed "s/^/@@bpfstatus /"; fi',
        f'for t in {q(_temp_prefix(loader))}*; do if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done',
        f"if [ -d {q(BPF_PIN_DIR)} ]; then echo @@bpfpinned; fi",
        f"if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet {q(render.BPF_UNIT_NAME)}; "
        "then echo @@bpfunit active; fi",
        # the kernel's config where the distro keeps it; the runtime signs below where it does not
        'c=/boot/config-$(uname -r); { if [ -r "$c" ]; then cat "$c"; elif [ -r /proc/config.gz ]; then '
        f"zcat /proc/config.gz; fi; }} 2>/dev/null | grep -E '^({configs})=' | sed 's/^/@@bpfconfig /'",
        "if [ -e /proc/sys/kernel/unprivileged_bpf_disabled ]; then echo @@bpfsyscall; fi",
        "if grep -qw cgroup2 /proc/filesystems; then echo @@bpfcgroup2; fi",
    ])


def _parse_bpf_line(bpf: BpfState, tag: str, rest: str, words: list[str]) -> None:
    if tag == "@@bpfloader" and len(words) == 1 and _SHA256.fullmatch(words[0]):
        bpf.loader_sha256 = words[0]
    elif tag == "@@bpfpinned" and not words:
        bpf.pinned = True
    elif tag == "@@bpfunit" and words == ["active"]:
        bpf.unit_active = True
    elif tag == "@@bpfconfig" and len(words) == 1 and _CONFIG_LINE.fullmatch(words[0]):
        name, _, value = words[0].partition("=")
        bpf.config[name] = value
    elif tag == "@@bpfsyscall" and not words:
        bpf.bpf_syscall = True
    elif tag == "@@bpfcgroup2" and not words:
        bpf.cgroup2 = True
    elif tag == "@@bpfstatus":
        _parse_bpf_status_line(bpf, rest)
    else:
        raise ToaError("not a line the state command prints")


def _parse_bpf_status_line(bpf: BpfState, line: str) -> None:
    """One line of `toa-bpf status` (toa/bpf/loader.c's cmd_status)."""
    name, _, value = line.strip().partition(" ")
    value = value.strip()
    if name == "object_sha256" and _SHA256.fullmatch(value):
        bpf.object_sha256 = value
    elif name == "attached" and value in ("yes", "no"):
        bpf.attached = value == "yes"
    elif name == "link":
        if re.search(r"\bprog_id=[1-9][0-9]*\b", value):
            bpf.links += 1
    elif name == "kinds" and (not value or _KINDS.fullmatch(value)):
        bpf.parameters["kinds"] = value
    elif name == "trusted" and re.fullmatch(r"[0-9A-Fa-f:.,/]*", value):
        bpf.parameters["trusted"] = value
    elif name in ("loaded_programs", "loaded_maps") and value.isdigit():
        pass
    else:
        raise ToaError("not a line toa-bpf status prints")


def parse_bpf_state(output: str) -> BpfState:
    """Parse the @@bpf lines of OUTPUT alone (bpf_state_command's, or a check after an attach). Pure."""
    bpf = BpfState()
    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if tag.startswith("@@bpf"):
            try:
                _parse_bpf_line(bpf, tag, rest, rest.split())
            except ToaError as exc:
                raise ToaError(f"unexpected line {line[:100]!r} from the eBPF engine: {exc}") from None
    return bpf


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


def _file_changes(state: ModuleState, files: list[AutoloadFile]) -> list[FileChange]:
    """What to write so that FILES are in place on a host in STATE. Pure."""
    changes = []
    for entry in files:
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
                           for path in (entry.path, state.resolved.get(entry.path)) if path]
    made_here = re.compile("(?:" + "|".join(map(re.escape, prefixes)) + f")[0-9a-f]{{{TEMP_SUFFIX_CHARS}}}")
    return tuple(path for path in state.stale if made_here.fullmatch(path))


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


# ---------------------------------------------------------------- loading and verifying


@dataclass(frozen=True)
class LoadOutcome:
    exit_code: int | None
    modprobe_output: str
    srcversion: str | None
    parameters: dict[str, str]
    kernel_log: list[str]  # lines after the marker
    rmmod_error: str = ""  # why the loaded toa could not be unloaded for a reload


def load_invocation(module_file: str, release: str, arguments: str) -> str:
    """The command that loads toa the way the host does: modprobe where toa.ko lives under
    /lib/modules, insmod of the file elsewhere (coreos targets' /var/lib/toa)."""
    words = [shlex.quote(word) for word in arguments.split()]
    if modules_dep_entry(module_file, release) is not None:
        return " ".join(["modprobe", "toa", *words])
    return " ".join(["insmod", shlex.quote(module_file), *words])


def load_command(module_file: str, release: str, arguments: str, marker: str, reload: bool) -> str:
    """Load toa (after rmmod when RELOAD) and print what verification needs (see parse_load)."""
    q = shlex.quote
    load = load_invocation(module_file, release, arguments)
    return "\n".join([
        PATH_SETTING,
        f"echo {q(marker)} > /dev/kmsg",
        *(['if [ -d /sys/module/toa ] && ! out=$(rmmod toa 2>&1); then '
           'printf "%s\\n" "$out" | sed "s/^/@@rmmod /"; exit 0; fi'] if reload else []),
        f'out=$({load} 2>&1); echo "@@exit $?"',
        'printf "%s\\n" "$out" | sed "s/^/@@modprobe /"',
        'if [ -d /sys/module/toa ]; then echo "@@srcversion $(cat /sys/module/toa/srcversion 2>/dev/null)"; fi',
        'for p in /sys/module/toa/parameters/*; do [ -r "$p" ] && echo "@@parameter ${p##*/} $(cat "$p")"; done',
        f'dmesg | sed -n {q("/" + marker + "/,$p")} | sed "s/^/@@log /"',
        "true",
    ]) + "\n"


def parse_load(output: str) -> LoadOutcome:
    """Parse load_command's output. Pure. Lines without a tag are ignored; a tagged line that is not
    what load_command prints is a ToaError."""
    exit_code, srcversion, modprobe, log, parameters, rmmod = None, None, [], [], {}, []
    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "@@rmmod":
            rmmod.append(rest)
        elif tag == "@@exit" and rest.strip().isdigit():
            exit_code = int(rest)
        elif tag == "@@modprobe":
            modprobe.append(rest)
        elif tag == "@@srcversion" and (not rest.strip() or _SRCVERSION.fullmatch(rest.strip())):
            srcversion = rest.strip() or None
        elif tag == "@@parameter" and rest.split():
            name, _, value = rest.partition(" ")
            parameters[name] = value.strip()
        elif tag == "@@log":
            log.append(rest)
        elif tag.startswith("@@"):
            raise ToaError(f"unexpected line {line[:100]!r} after the load")
    return LoadOutcome(exit_code, "\n".join(line for line in modprobe if line.strip()), srcversion, parameters, log[1:],
                       " ".join(line.strip() for line in rmmod if line.strip()))


def check_load(outcome: LoadOutcome, artifact: Artifact, parameters: dict[str, str]) -> None:
    """Raise a one-line ToaError unless the load worked and loaded ARTIFACT. Pure."""
    if outcome.rmmod_error:
        raise ToaError(f"the loaded toa cannot be unloaded to load the new one ({outcome.rmmod_error}): "
                       "stop what holds it, then run again")
    if KEY_REJECTED in outcome.modprobe_output or any(KEY_REJECTED in line for line in outcome.kernel_log):
        raise ToaError("the host only loads signed modules (Secure Boot or module.sig_enforce=1) and refused "
                       "toa.ko: sign toa.ko with a key the host trusts (enrolled MOK or built-in keyring)")
    if outcome.exit_code != 0:
        reason = (outcome.modprobe_output.splitlines() or ["no output"])[-1]
        raise ToaError(f"loading toa failed (exit {outcome.exit_code}): {reason}")
    if not any(LOADED_MESSAGE in line for line in outcome.kernel_log):
        raise ToaError(f"the kernel log after the load has no {LOADED_MESSAGE!r}: check dmesg on the host")
    if outcome.srcversion is None:
        raise ToaError("toa is not in /sys/module after the load: check dmesg on the host")
    if outcome.srcversion != artifact.srcversion:
        raise ToaError(f"the loaded toa has srcversion {outcome.srcversion}, the artifact {artifact.srcversion}: "
                       "another toa.ko is found first; check `modinfo toa` on the host")
    wrong = parameters_differ(outcome.parameters, parameters)
    if wrong:
        raise ToaError(f"toa loaded with {outcome.parameters}, wanted {wrong}: check /etc/modprobe.d on the host")


# ---------------------------------------------------------------- one host


@dataclass
class HostResult:
    host: str
    kernel: str | None = None
    action: str = "failed"  # installed, updated, unchanged, failed, skipped; would-install, would-update
    detail: str = ""
    changes: list[str] = field(default_factory=list)
    engine: str | None = None  # module or bpf, once chosen

    def as_dict(self) -> dict:
        return {"host": self.host, "kernel": self.kernel, "action": self.action, "detail": self.detail,
                "changes": self.changes, "engine": self.engine}


@dataclass(frozen=True)
class DeployOptions:
    dist: Path = Path("dist")
    ssh: remote.SshOptions = remote.SshOptions()  # its timeout is the connect timeout
    options: dict[str, str] | None = None  # module options, e.g. {"kinds": "254,200"}
    build_missing: bool = False
    dry_run: bool = False
    command_timeout: float = COMMAND_TIMEOUT_SECONDS  # seconds each command or transfer on a host may take
    # which kernels get toa.ko: the running one (loaded), the one the next boot runs, every installed one
    kernels: tuple[str, ...] = ("running", "next")
    engine: str = "module"  # module, bpf, or auto (bpf where the host can run it, see choose_engine)


CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)


class Host:
    """One open connection and the way to run commands as root on it. Every command and transfer has
    COMMAND_TIMEOUT seconds; once one was cut short or the connection broke, the connection is lost:
    nothing more runs over it (see reconnect)."""

    def __init__(self, node: Node, ssh: remote.SshOptions, command_timeout: float):
        self.node, self.ssh, self.command_timeout = node, ssh, command_timeout
        self.lost = False
        key = str(node.key) if node.key else ssh.key_filename
        self.conn = remote.connect(node.spec, dataclasses.replace(ssh, key_filename=key))
        try:
            remote.limit(self.conn, command_timeout)
            self.sudo = self._sudo_prefix()
        except BaseException:
            self.conn.close()
            raise

    def reconnect(self) -> Host:
        """A new connection to the same host after this one was lost: one attempt, with a connect
        timeout of at most RECONNECT_SECONDS."""
        self.close()
        ssh = dataclasses.replace(self.ssh, timeout=min(self.ssh.timeout, RECONNECT_SECONDS))
        return Host(self.node, ssh, self.command_timeout)

    def _sudo_prefix(self) -> str:
        if self.run_as_user("id -u", "id -u").strip() == "0":
            return ""
        user = self.node.spec.user or self.conn.user
        if not self.node.sudo:
            raise ToaError(f"{user} is not root and sudo=no for this host: connect as root or set sudo=yes in the nodes file")
        if self._call("sudo -n true", lambda: remote.execute(self.conn, "sudo -n true", "sudo -n true")).failed:
            raise ToaError(f"{user} cannot run `sudo -n` without a password: allow it in sudoers or connect as root")
        return "sudo -n "

    def _call(self, what: str, operation: Callable):
        if self.lost:
            raise remote.ConnectionLost(f"the connection to {self.node.name} was lost before {what}")
        try:
            return operation()
        except remote.ConnectionLost:
            self.lost = True
            raise

    def run_as_user(self, command: str, what: str) -> str:
        return self._call(what, lambda: remote.run(self.conn, command, what))

    def run_as_root(self, script: str, what: str) -> str:
        return self._call(what, lambda: remote.run(self.conn, f"{self.sudo}sh -c {shlex.quote(script)}", what))

    def put(self, local: Path, path: str) -> None:
        self._call("upload", lambda: remote.put(self.conn, str(local), path))

    def detect(self) -> detect.Platform:
        """The host's platform; its kernel release checked."""
        def identify(output: str) -> detect.Platform:
            platform = detect.identify(detect.parse_remote_facts(output))
            validate_release(platform.kernel or "")
            return platform

        return self.parse("detect", identify, self.run_as_user(detect.REMOTE_FACTS_COMMAND, "detect"))

    def parse(self, what: str, parser: Callable, output: str):
        """PARSER(OUTPUT); output it cannot make sense of is a ToaError naming the host and WHAT."""
        try:
            return parser(output)
        except (ToaError, ValueError, IndexError) as exc:
            raise ToaError(f"unexpected output from {self.node.name} ({what}): {exc}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass  # the host went away: nothing left to close politely


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


def _preflight(host: Host, artifact: Artifact, release: str) -> None:
    """Refuse, before anything is uploaded, a module the host's kernel would not load: the build's
    preflight checks against what the host has of its kernel's tree (build tree or /boot files)."""
    module = preflight.read_module(artifact.ko.read_bytes())
    script = preflight.host_tree_command(release, list(module.crcs))
    output = host.run_as_user(f"sh -c {shlex.quote(script)}", "preflight")
    tree = host.parse("preflight", lambda text: preflight.parse_host_tree(text, release, host.node.name), output)
    refused = preflight.refusal(preflight.run(module, tree), release)
    if refused:
        raise ToaError(f"{refused}; nothing was uploaded")


def _replace_script(path: str, *, create: str, check: str, same: str, mode: int | None, keep_mode: bool = False,
                    resolve: bool = True, mark: str = FILE_TEMP_MARK, before_rename: str = "") -> str:
    """The one way deploy puts a file on a host, all or nothing (see the module docstring).

    In the script, $p is PATH and $t the file replaced: PATH's target when RESOLVE (readlink -f), else
    PATH itself (a symlink toa owns); $tmp is the temp name beside $t. CREATE writes $tmp; CHECK is a
    test that it holds what was sent; SAME a test that $t already does (nothing to do then). $tmp takes
    $t's owner and SELinux label, and MODE, or with KEEP_MODE $t's mode where $t exists; MODE None
    leaves modes alone (symlinks). BEFORE_RENAME runs just before the rename. Any failing step prints
    one line naming it and exits 1; the temp name never outlives the script."""
    q = shlex.quote
    lines = [
        "set -e", PATH_SETTING,
        'fail() { printf "%s\\n" "$*" >&2; exit 1; }',
        f"p={q(path)}",
        'mkdir -p -- "$(dirname -- "$p")" || fail "cannot create the directory of $p"',
        't=$(readlink -f -- "$p") && [ -n "$t" ] || fail "cannot resolve $p"' if resolve else 't=$p',
        f'tmp="$(dirname -- "$t")/.$(basename -- "$t")"{q(mark + _temp_suffix())}',
        'trap \'rm -f -- "$tmp"\' EXIT',
        f"if {same}; then exit 0; fi",
        # the pipeline's status alone says little (a full disk can fail either side): CHECK decides
        f'if ! err=$( {{ {create}; }} 2>&1 ); then fail "cannot write $t: $(printf %s "$err" | tr "\\n" " ")"; fi',
        f'{check} || fail "cannot write $t: the temp file does not hold what was sent (is the disk full?)"',
    ]
    if mode is not None:
        keep = ['chown --reference="$t" -- "$tmp" || fail "cannot give $tmp the owner of $t"',
                'if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled && command -v chcon >/dev/null 2>&1; '
                'then chcon --reference="$t" -- "$tmp" || fail "cannot give $tmp the SELinux label of $t"; fi']
        set_mode = f'chmod {mode:o} -- "$tmp" || fail "cannot set the mode of $tmp"'
        if keep_mode:
            keep.append('chmod --reference="$t" -- "$tmp" || fail "cannot give $tmp the mode of $t"')
            lines += ['if [ -e "$t" ]; then', *keep, "else", set_mode, "fi"]
        else:
            lines += ['if [ -e "$t" ]; then', *keep, "fi", set_mode]
    lines += ["sync", *([before_rename] if before_rename else []),
              'mv -f -T -- "$tmp" "$t" || fail "cannot rename $tmp over $t"', "sync", ""]
    return "\n".join(lines)


def _sha_of(file_var: str) -> str:
    return f'"$(sha256sum < "{file_var}" | cut -d" " -f1)"'


def _write_file_script(path: str, kind: str, text: str, mode: int, *, keep_mode: bool = False,
                       resolve: bool = True) -> str:
    """Make PATH a file holding TEXT with MODE (KEEP_MODE: the existing file's mode), written where
    PATH points if it is a symlink (unless not RESOLVE); or, for KIND symlink, make PATH a symlink to TEXT."""
    q = shlex.quote
    if kind == "symlink":
        return _replace_script(path, create=f'ln -s -- {q(text)} "$tmp"',
                               check=f'[ "$(readlink -- "$tmp")" = {q(text)} ]',
                               same=f'[ -L "$t" ] && [ "$(readlink -- "$t")" = {q(text)} ]', mode=None, resolve=False)
    sha = hashlib.sha256(text.encode()).hexdigest()
    encoded = base64.b64encode(text.encode()).decode()
    same = f'[ -f "$t" ] && [ {_sha_of("$t")} = {sha} ]'
    if not keep_mode:
        same += f' && [ "$(stat -c %a -- "$t")" = {mode:o} ]'
    return _replace_script(path, create=f'printf %s {q(encoded)} | base64 -d > "$tmp"',
                           check=f'[ {_sha_of("$tmp")} = {sha} ]', same=same, mode=mode, keep_mode=keep_mode,
                           resolve=resolve)


def _remove_file_script(path: str, *, resolve: bool = True) -> str:
    """Remove PATH (where it points when RESOLVE, as _write_file_script wrote it)."""
    q = shlex.quote
    target = f't=$(readlink -f -- {q(path)}) || exit 0' if resolve else f"t={q(path)}"
    return f'{PATH_SETTING}\n{target}\nrm -f -- "$t"\nsync\n'


def _writes(entry: AutoloadFile) -> dict:
    """How ENTRY's path is written, whatever is put there: where it points if it is a symlink (but
    a symlink toa owns is replaced itself), keeping the existing file's mode for a shared file (a
    file toa owns gets its own)."""
    return {"keep_mode": entry.kind == "lines", "resolve": entry.kind != "symlink"}


@dataclass
class _Done:
    """What a run changed so far: what a rollback must undo."""

    installed: bool = False
    load_attempted: bool = False
    files: list[FileChange] = field(default_factory=list)
    # toa.ko installed for other kernels: (module file, release, sha256 of the file it replaced or None)
    others: list[tuple[str, str, str | None]] = field(default_factory=list)
    loader_installed: bool = False  # the eBPF engine's loader
    bpf_changed: bool = False  # the eBPF engine was (or may have been) detached, attached or set


def _parse_staging(output: str) -> str:
    staging = output.strip()
    if not re.fullmatch(re.escape(STAGING_PREFIX) + r"[A-Za-z0-9]{8}", staging):
        raise ToaError(f"mktemp printed {staging[:60]!r}, not a directory under {STAGING_PREFIX}")
    return staging


def _parse_sha256sum(output: str) -> str:
    words = output.split()
    if not words or not _SHA256.fullmatch(words[0]):
        raise ToaError(f"sha256sum printed {output.strip()[:80]!r}")
    return words[0]


def _install_module(host: Host, artifact: Artifact, module_file: str, say) -> None:
    _install_file(host, artifact.ko, artifact.sha256, module_file, 0o644, MODULE_TEMP_MARK, say)


def _install_file(host: Host, local: Path, sha: str, path: str, mode: int, mark: str, say) -> None:
    """Upload LOCAL (whose sha256 is SHA) and put it at PATH with MODE, the file it replaces kept
    as PATH.prev for a rollback (_restore_module_script)."""
    q = shlex.quote
    name = posixpath.basename(path)
    staging = host.parse("mktemp", _parse_staging, host.run_as_user(f"mktemp -d {q(STAGING_PREFIX)}XXXXXXXX", "mktemp"))
    staged = f"{staging}/{name}"
    try:
        say("upload")
        host.put(local, staged)
        uploaded = host.parse("sha256sum of the upload", _parse_sha256sum,
                              host.run_as_user(f"sha256sum {q(staged)}", "sha256sum of the upload"))
        if uploaded != sha:
            raise ToaError(f"the uploaded {name} has another sha256 than the artifact: the transfer was damaged, run again")
        host.run_as_root(_replace_script(
            path, create=f'cat -- {q(staged)} > "$tmp"', check=f'[ {_sha_of("$tmp")} = {sha} ]',
            same=f'[ -f "$t" ] && [ {_sha_of("$t")} = {sha} ]', mode=mode, mark=mark,
            before_rename='if [ -f "$t" ]; then ln -f -- "$t" "$t.prev" || fail "cannot keep $t as $t.prev"; fi'),
            f"installing {name}")
    finally:
        try:
            host.run_as_user(f"rm -rf {q(staging)}", "removing the upload")
        except ToaError:
            pass  # the host is gone; the next boot or run finds a stale upload under /tmp only


def _depmod(host: Host, release: str) -> None:
    host.run_as_root(f"{PATH_SETTING}\ndepmod -a {shlex.quote(release)}\n", "depmod")


def _apply(host: Host, plan: Plan, artifact: Artifact, module_file: str, parameters: dict[str, str],
           done: _Done, say) -> None:
    release = artifact.release
    if plan.stale:
        host.run_as_root(f"rm -f {' '.join(shlex.quote(path) for path in plan.stale)}\nsync\n",
                         "removing temp files of an interrupted run")
    if plan.install:
        done.installed = True  # from here on the rollback restores the previous file
        _install_module(host, artifact, module_file, say)
        say("installed")
    if plan.depmod:
        say("depmod")
        _depmod(host, release)
    if plan.detach_bpf:
        say("detach bpf")
        done.bpf_changed = True
        host.run_as_root(_detach_bpf_script(), "detaching the eBPF engine")
    if plan.load:
        say(plan.load)
        done.load_attempted = True
        marker = f"toa-deploy: load {secrets.token_hex(8)}"
        # every wanted parameter on the command line: they come after, and win over, any options
        # an older /etc/modprobe.d/toa.conf still gives until the autoload files are rewritten
        output = host.run_as_root(load_command(module_file, release, render.module_options(parameters), marker,
                                               reload=plan.load == "reload"), f"{plan.load} toa")
        check_load(host.parse(f"{plan.load} toa", parse_load, output), artifact, parameters)
    _change_files(host, plan.files, done, say)
    if plan.detach_bpf:
        _daemon_reload(host)


def _change_files(host: Host, changes, done: _Done, say) -> None:
    for change in changes:
        say("autoload")
        done.files.append(change)
        if change.text is None:
            script = _remove_file_script(change.entry.path, resolve=_writes(change.entry)["resolve"])
        else:
            kind = "symlink" if change.entry.kind == "symlink" else "file"
            script = _write_file_script(change.entry.path, kind, change.text, change.entry.mode, **_writes(change.entry))
        host.run_as_root(script, f"{'removing' if change.text is None else 'writing'} {change.entry.path}")


# ---------------------------------------------------------------- the eBPF engine: attach, verify, detach

BPF_ATTACH_FAILED = "the eBPF engine did not attach"


def _unit_command(verb: str) -> str:
    return f"systemctl {verb} {shlex.quote(render.BPF_UNIT_NAME)}"


def _daemon_reload(host: Host) -> None:
    host.run_as_root(f"{PATH_SETTING}\nsystemctl daemon-reload\n", "systemctl daemon-reload")


def _detach_bpf_script(loader: str = render.BPF_LOADER) -> str:
    """Stop the unit (its ExecStop detaches) and detach whatever is still pinned, with any toa-bpf
    the host has (ours, or a package's); checked: nothing stays pinned."""
    q = shlex.quote
    return "\n".join([
        PATH_SETTING,
        f"if command -v systemctl >/dev/null 2>&1; then {_unit_command('stop')} 2>/dev/null; "
        f"{_unit_command('reset-failed')} 2>/dev/null; fi",
        f"if [ -d {q(BPF_PIN_DIR)} ]; then",
        f"  for l in {q(loader)} {q(render.PACKAGED_BPF_LOADER)}; do [ -x \"$l\" ] && \"$l\" detach && break; done",
        "fi",
        f"if [ -d {q(BPF_PIN_DIR)} ]; then echo \"{BPF_PIN_DIR} is still there after the detach\" >&2; exit 1; fi",
        ""])


def _attach_bpf_script(how: str, parameters: dict[str, str], loader: str = render.BPF_LOADER) -> str:
    """Attach (HOW: attach, reattach) through the unit, or set the options of the engine attached."""
    q = shlex.quote
    if how == "set":
        return f"{PATH_SETTING}\n{q(loader)} set {render.module_options(parameters)}\n"
    return "\n".join([
        _detach_bpf_script(loader) if how == "reattach" else PATH_SETTING,
        f"if ! {_unit_command('start')} 2>/dev/null; then",
        # this start's journal says why: the loader's last line (the kernel's refusal)
        f"  id=$(systemctl show -p InvocationID --value {q(render.BPF_UNIT_NAME)})",
        '  why=$(journalctl "_SYSTEMD_INVOCATION_ID=$id" -o cat --no-pager 2>/dev/null | grep "^toa-bpf: " | tail -n 1)',
        f'  echo "{BPF_ATTACH_FAILED} ({render.BPF_UNIT_NAME} failed): ${{why:-see journalctl -u {render.BPF_UNIT_NAME}}}" >&2',
        "  exit 1",
        "fi", ""])


def bpf_check_command(loader: str = render.BPF_LOADER) -> str:
    """After an attach: the loader's status, the unit's state and whether toa.ko is loaded."""
    q = shlex.quote
    return "\n".join([
        PATH_SETTING,
        f'{q(loader)} status | sed "s/^/@@bpfstatus /"',
        f"if [ -d {q(BPF_PIN_DIR)} ]; then echo @@bpfpinned; fi",
        f"if {_unit_command('is-active')} --quiet; then echo @@bpfunit active; fi",
        'if [ -d /sys/module/toa ]; then echo "@@loaded"; fi',
        "true", ""])


def check_bpf(output: str, object_sha256: str, parameters: dict[str, str]) -> None:
    """Raise a one-line ToaError unless the engine runs the build's object, attached through the unit
    with PARAMETERS, and no toa.ko is loaded beside it. Pure."""
    bpf = parse_bpf_state(output)
    module_loaded = any(line.strip() == "@@loaded" for line in output.splitlines())
    if not bpf.attached or bpf.links != BPF_PROGRAMS:
        raise ToaError(f"{BPF_ATTACH_FAILED}: toa-bpf status shows attached={'yes' if bpf.attached else 'no'} "
                       f"with {bpf.links} of {BPF_PROGRAMS} programs linked")
    if bpf.object_sha256 != object_sha256:
        raise ToaError(f"the host's toa-bpf carries object {bpf.object_sha256}, the build {object_sha256}: "
                       f"check {render.BPF_LOADER} on the host")
    if not same_parameters(bpf.parameters, parameters):
        raise ToaError(f"the eBPF engine runs with {bpf.parameters}, wanted {parameters}")
    if not bpf.unit_active:
        raise ToaError(f"the eBPF engine is attached but {render.BPF_UNIT_NAME} is not active: "
                       f"check `systemctl status {render.BPF_UNIT_NAME}` on the host")
    if module_loaded:
        raise ToaError("toa.ko is loaded beside the eBPF engine: check what loads it on the host")


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


def _deploy_bpf(host: Host, state: ModuleState, module_files: list[AutoloadFile], options: DeployOptions,
                result: HostResult, done: _Done, say) -> None:
    """The eBPF engine on one host, the module taken away (see make_bpf_plan); RESULT filled in."""
    built = _bpf_build_for(options, say)
    fresh = state.bpf.loader_sha256 is None and not state.bpf.active and not state.loaded
    if built is None:
        result.action = "would-install" if fresh else "would-update"
        result.detail = "build the eBPF engine (--build-missing), then install and attach it"
        return
    parameters = wanted_parameters(options.options)
    plan = make_bpf_plan(state, engine_bpf.sha256(built.loader), render.bpf_files(options.options), module_files,
                         options.options)
    result.changes = plan.describe(built)
    if plan.empty:
        result.action = "unchanged"
        result.detail = f"eBPF engine {built.object_sha256[:16]} attached, nothing to do"
        return
    if options.dry_run:
        result.action = "would-install" if fresh else "would-update"
        result.detail = "; ".join(result.changes)
        return
    if plan.stale:
        host.run_as_root(f"rm -f {' '.join(shlex.quote(path) for path in plan.stale)}\nsync\n",
                         "removing temp files of an interrupted run")
    if plan.install:
        done.loader_installed = True
        _install_file(host, built.loader, engine_bpf.sha256(built.loader), render.BPF_LOADER, 0o755, FILE_TEMP_MARK, say)
    # the unit and its link first, the module's boot files taken away: a power cut from here boots
    # one engine (the unit refuses to attach beside a loaded toa.ko)
    _change_files(host, plan.files, done, say)
    if plan.units_changed:
        _daemon_reload(host)
    if plan.unload_module:
        say("unload toa.ko")
        done.load_attempted = True  # the rollback loads the previous toa again
        host.run_as_root(f"{PATH_SETTING}\nif [ -d /sys/module/toa ]; then rmmod toa || exit 1; fi\n", "unloading toa.ko")
    if plan.attach:
        say(plan.attach)
        done.bpf_changed = True
        host.run_as_root(_attach_bpf_script(plan.attach, parameters), f"{plan.attach} the eBPF engine")
    say("verify")
    check_bpf(host.run_as_root(bpf_check_command(), "reading toa-bpf status"), built.object_sha256, parameters)
    result.action = "installed" if fresh else "updated"
    result.detail = f"eBPF engine {built.object_sha256[:16]} attached; " + "; ".join(result.changes)


def _reattach_previous_bpf_script(state: ModuleState) -> str:
    """Attach the eBPF engine again as STATE had it: through the unit if the host (after the
    rollback's restores) has one, else with the loader and the options it had."""
    q = shlex.quote
    arguments = render.module_options({k: v for k, v in state.bpf.parameters.items() if k in DEFAULT_PARAMETERS})
    return "\n".join([
        PATH_SETTING,
        f"if [ -d {q(BPF_PIN_DIR)} ]; then exit 0; fi",
        f"if [ -f {q(render.BPF_UNIT)} ]; then systemctl daemon-reload; {_unit_command('start')}; "
        f"else {q(render.BPF_LOADER)} attach {arguments}; fi",
        ""])


def _restore_module_script(module_file: str, release: str, old: str | None) -> str:
    """Put back the toa.ko this run found (OLD: its sha256; None: there was none)."""
    q = shlex.quote
    # only when toa.ko really changed, and only from a toa.ko.prev that is the file this run found:
    # an install cut short before its hard link must not bring back an older toa.ko.prev; the
    # rename is checked like every write (toa.ko.prev is the temp name whose content was checked)
    restore = (f'[ {_sha_of("$m.prev")} = {q(old)} ] || '
               '{ echo "toa.ko.prev is not the module this run replaced" >&2; exit 1; }; mv -f -T -- "$m.prev" "$m"'
               if old else 'rm -f -- "$m"')
    depmod = f"depmod -a {q(release)}" if modules_dep_entry(module_file, release) is not None else "true"
    return "\n".join([
        PATH_SETTING, f"m=$(readlink -f -- {q(module_file)}) || m={q(module_file)}",
        f'if [ "$(sha256sum < "$m" 2>/dev/null | cut -d" " -f1)" != {q(old or "")} ]; then {restore} || exit 1; fi',
        f"sync; {depmod}", ""])


def _reload_previous_script(module_file: str, release: str, state: ModuleState) -> str:
    """Load again the build STATE had loaded, with its options, as the host loads modules; checked."""
    q = shlex.quote
    want = q(state.loaded_srcversion or "")
    arguments = render.module_options({k: v for k, v in state.parameters.items() if k in DEFAULT_PARAMETERS})
    return "\n".join([
        PATH_SETTING,
        f'if [ "$(cat /sys/module/toa/srcversion 2>/dev/null)" != {want} ]; then',
        '  if [ -d /sys/module/toa ]; then rmmod toa || exit 1; fi',
        f"  {load_invocation(module_file, release, arguments)} || exit 1",
        f'  now=$(cat /sys/module/toa/srcversion 2>/dev/null); [ "$now" = {want} ] || '
        f'{{ echo "toa loaded again has srcversion ${{now:-none}}, not {state.loaded_srcversion}" >&2; exit 1; }}',
        "fi", ""])


def _deploy_other_kernels(host: Host, platform: detect.Platform, state: ModuleState, options: DeployOptions,
                          result: HostResult, done: _Done, say) -> None:
    """toa.ko for the other kernels options.kernels names (the next boot's, the installed ones):
    installed and indexed, not loaded. A kernel that already has a toa.ko (toa's, or a DKMS or kmod
    package's) is left as it is; one without a build is named in the result."""
    added, notes = [], []
    for other, why in other_kernels(platform, options.kernels).items():
        own_sha, found = state.others.get(other, (None, None))
        artifact = (_artifact_for(other, platform.target.id, options, say) if options.build_missing
                    else artifacts.find(options.dist, other, platform.target.id))
        if artifact is None:
            if found is None:
                notes.append(f"{other} ({why}) has no toa.ko: " + (
                    "it would be built first" if options.build_missing else "build it (--build-missing)"))
            continue
        if own_sha == artifact.sha256 or (own_sha is None and found is not None):
            continue  # in place already, or covered by a package's module
        step = f"install toa.ko for {other} ({why})"
        result.changes.append(step)
        added.append(step)
        if options.dry_run:
            continue
        other_file = render.module_path(platform.target, other)
        done.others.append((other_file, other, own_sha))
        _install_module(host, artifact, other_file, say)
        if modules_dep_entry(other_file, other) is not None:
            _depmod(host, other)
    if added and result.action == "unchanged":
        result.action = "would-update" if options.dry_run else "updated"
    if added or notes:
        result.detail = "; ".join(part for part in (result.detail, *added, *notes) if part)


def _rollback(host: Host, state: ModuleState, module_file: str, release: str, done: _Done) -> list[str]:
    """Put back what DONE changed; the steps that could not be undone, as text. Never raises: a
    step's error, whatever it is, is that step's problem; once the connection is lost the steps
    left are not attempted."""
    problems: list[str] = []
    steps: list[tuple[str, Callable[[], str]]] = []
    if done.bpf_changed:  # first: never two engines, not even while rolling back
        steps.append(("detaching the eBPF engine", _detach_bpf_script))
    for other_file, other, old in reversed(done.others):
        steps.append((f"restoring toa.ko of {other}", partial(_restore_module_script, other_file, other, old)))
    for change in reversed(done.files):
        previous, entry = change.previous, change.entry
        if previous is None:
            steps.append((f"removing {entry.path}", partial(_remove_file_script, entry.path, resolve=_writes(entry)["resolve"])))
        else:
            steps.append((f"restoring {entry.path}", partial(_write_file_script, entry.path, previous.kind,
                                                             previous.text, previous.mode, **_writes(entry))))
    if done.installed:
        steps.append(("restoring the previous toa.ko",
                      partial(_restore_module_script, module_file, release, state.installed_sha256)))
    if done.loader_installed:
        steps.append(("restoring the previous toa-bpf",
                      partial(_restore_module_script, render.BPF_LOADER, release, state.bpf.loader_sha256)))
    if any(change.entry.path.startswith("/etc/systemd/") for change in done.files):
        steps.append(("systemctl daemon-reload", lambda: f"{PATH_SETTING}\nsystemctl daemon-reload\n"))
    if done.load_attempted:
        if state.loaded and state.loaded_srcversion:
            steps.append(("loading the previous toa again", partial(_reload_previous_script, module_file, release, state)))
        elif not state.loaded:
            steps.append(("unloading toa", lambda: f"{PATH_SETTING}\nif [ -d /sys/module/toa ]; then rmmod toa; fi\n"))
    if done.bpf_changed and state.bpf.active:
        steps.append(("attaching the previous eBPF engine again", partial(_reattach_previous_bpf_script, state)))
    for what, script in steps:
        if host.lost:
            problems.append(f"{what}: not attempted")
            continue
        try:
            host.run_as_root(script(), f"rollback: {what}")
        except Exception as exc:  # noqa: BLE001 - see the docstring
            problems.append(f"{what}: {_describe_failure(exc)}")
    return problems


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ToaError):
        return str(exc)
    if isinstance(exc, CONNECTION_ERRORS):
        return f"connection lost: {exc or type(exc).__name__}"
    return f"unexpected error ({type(exc).__name__}: {exc}): please report it"


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


def _read(host: Host, options: DeployOptions, say):
    """Detect the host and read its state: (platform, release, module file, autoload files, state)."""
    say("detect")
    platform = host.detect()
    release = platform.kernel
    if platform.target is None:
        raise ToaError(f"{platform.support}; toa cannot tell how it loads modules at boot")
    module_file = render.module_path(platform.target, release)
    # the kernel hooks' module sources too: a kernel installed later gets toa.ko built from them
    files = (render.autoload_files(platform.target, release, init=platform.init, options=options.options)
             + render.hook_sources(platform.target))
    others = tuple((other, render.module_path(platform.target, other))
                   for other in other_kernels(platform, ("next", *options.kernels)))
    # the eBPF engine's files and facts in the same round trip: the engine choice needs them
    read = files + render.bpf_files(options.options)
    output = host.run_as_root(state_command(module_file, release, read, others) + bpf_state_command(),
                              "reading the module state")
    state = host.parse("reading the module state", lambda text: parse_state(text, read), output)
    return platform, release, module_file, files, state


def deploy_host(node: Node, options: DeployOptions, progress: Progress | None = None) -> HostResult:
    """Deploy to one host; never raises for a host's own failure (it is in the result)."""
    result = HostResult(node.name)

    def say(step: str) -> None:
        if progress:
            progress(node.name, step)

    host = state = None
    done = _Done()
    try:
        say("connect")
        host = Host(node, options.ssh, options.command_timeout)
        platform, release, module_file, files, state = _read(host, options, say)
        result.kernel = release
        result.engine, why = choose_engine(platform, state.bpf, options.engine)
        if result.engine == "bpf":
            _deploy_bpf(host, state, files, options, result, done, say)
            result.detail = f"{result.detail} ({why})" if options.engine == "auto" else result.detail
            say("done")
            return result
        artifact = _artifact_for(release, platform.target.id, options, say)
        if artifact is None:
            result.action = "would-install"
            result.detail = f"build toa.ko for {release} (--build-missing), then install, load and autoload it"
            say("done")
            return result
        parameters = wanted_parameters(options.options)
        plan = make_plan(state, artifact, files, module_file, options.options, render.bpf_files(options.options))
        if plan.install:
            say("preflight")
            _preflight(host, artifact, release)
        result.changes = plan.describe(artifact)
        fresh = state.installed_sha256 is None and not state.loaded
        if plan.empty:
            result.action, result.detail = "unchanged", f"toa {artifact.srcversion} loaded, nothing to do"
        elif options.dry_run:
            result.action = "would-install" if fresh else "would-update"
            result.detail = "; ".join(result.changes)
        else:
            _apply(host, plan, artifact, module_file, parameters, done, say)
            result.action = "installed" if fresh else "updated"
            result.detail = f"toa {artifact.srcversion} loaded; " + "; ".join(result.changes)
        _deploy_other_kernels(host, platform, state, options, result, done, say)
        say("done")
    except Exception as exc:  # noqa: BLE001 - one host's failure, whatever it is, is that host's result alone
        result.action, result.detail = "failed", _describe_failure(exc)
        if host is not None and state is not None and (done.installed or done.load_attempted or done.files
                                                       or done.loader_installed or done.bpf_changed):
            say("rollback")
            if host.lost:
                try:
                    host = host.reconnect()
                except Exception as again:  # noqa: BLE001
                    host = None
                    result.detail += f"; not rolled back: reconnecting failed ({_describe_failure(again)})"
            if host is not None:
                problems = _rollback(host, state, module_file, result.kernel, done)
                result.detail += "; rolled back" if not problems else "; rollback incomplete: " + "; ".join(problems)
        say("failed")
    finally:
        if host is not None:
            host.close()
    return result


# ---------------------------------------------------------------- the fleet


def run_fleet(nodes: list[Node], work: Callable[[Node], HostResult], *, parallel: int = 5, batch: int = 0,
              max_fail: int = 0) -> list[HostResult]:
    """WORK on every node, PARALLEL at a time, in batches of BATCH nodes (0: all in one); once more
    than MAX_FAIL hosts failed, the batches not started are skipped. Results in NODES' order."""
    if parallel < 1 or batch < 0 or max_fail < 0:
        raise ToaError("--parallel must be 1 or more, --batch and --max-fail 0 or more")
    size = batch or len(nodes)
    results: list[HostResult] = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for start in range(0, len(nodes), size):
            group = nodes[start:start + size]
            failed = sum(result.action == "failed" for result in results)
            if failed > max_fail:
                results += [HostResult(node.name, action="skipped",
                                       detail=f"not started: {failed} host(s) failed, more than --max-fail {max_fail}")
                            for node in group]
                continue
            results += list(pool.map(work, group))
    return results


def deploy(nodes: list[Node], options: DeployOptions, *, parallel: int = 5, batch: int = 0, max_fail: int = 0,
           progress: Progress | None = None) -> list[HostResult]:
    """Deploy to NODES (see run_fleet for the batching)."""
    wanted_parameters(options.options)  # bad options fail before any host is contacted
    return run_fleet(nodes, lambda node: deploy_host(node, options, progress),
                     parallel=parallel, batch=batch, max_fail=max_fail)


# ---------------------------------------------------------------- status


@dataclass
class HostStatus:
    host: str
    kernel: str | None = None
    loaded: bool | None = None
    loaded_srcversion: str | None = None
    installed_srcversion: str | None = None
    artifact: str = "-"  # match, differs, none
    autoload: str = "-"  # complete, partial, absent
    next_kernel: str | None = None
    next_boot: str = "-"  # toa.ko in place, NO toa.ko, the running kernel, or "-" (not told)
    engine: str | None = None  # module, bpf, none, or "module+bpf" (both: redeploy one)
    counters: str | None = None  # where the engine's counters are read
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def autoload_summary(state: ModuleState, files: list[AutoloadFile]) -> str:
    """complete, partial or absent: whether each autoload file holds what a deploy writes. Pure."""
    present = 0
    for entry in files:
        current = state.files.get(entry.path)
        if current is not None and current.text == wanted_text(entry, current):
            present += 1
    return "complete" if present == len(files) else "absent" if present == 0 else "partial"


COUNTERS = {"module": "/proc/net/toa_stats", "bpf": f"{render.BPF_LOADER} stats"}


def engine_summary(state: ModuleState) -> tuple[str, str | None]:
    """(engine, where its counters are read): module, bpf, none, or module+bpf. Pure."""
    engines = [name for name, on in (("module", state.loaded), ("bpf", state.bpf.active)) if on]
    if not engines:
        return "none", None
    return "+".join(engines), ", ".join(COUNTERS[name] for name in engines)


def next_boot(platform: detect.Platform, state: ModuleState) -> str:
    """Whether the kernel the host boots next has a toa.ko. Pure."""
    if platform.next_kernel is None:
        return "-"
    if platform.next_kernel == platform.kernel:
        return "the running kernel"
    own_sha, found = state.others.get(platform.next_kernel, (None, None))
    if not own_sha and found and "/weak-updates/" in found:
        # SUSE's weak-modules2 (RHEL's weak-modules) linked in a package's toa.ko built for a kABI-compatible kernel
        return "toa.ko in place (weak-updates: a kABI-compatible kernel's)"
    return "toa.ko in place" if own_sha or found else f"NO toa.ko: {platform.next_kernel} boots without toa"


def status_host(node: Node, options: DeployOptions, progress: Progress | None = None) -> HostStatus:
    status = HostStatus(node.name)

    def say(step: str) -> None:
        if progress:
            progress(node.name, step)

    host = None
    try:
        say("connect")
        host = Host(node, options.ssh, options.command_timeout)
        platform, release, _module_file, files, state = _read(host, options, say)
        status.kernel = release
        status.loaded, status.loaded_srcversion = state.loaded, state.loaded_srcversion
        status.installed_srcversion = state.installed_srcversion
        artifact = artifacts.find(options.dist, release, platform.target.id)
        if artifact is None:
            status.artifact = "none"
        else:
            matches = state.installed_sha256 == artifact.sha256 and state.loaded_srcversion == artifact.srcversion
            status.artifact = "match" if matches else "differs"
        status.engine, status.counters = engine_summary(state)
        # the boot files of the engine that runs: the eBPF engine's unit and link, else the module's
        status.autoload = autoload_summary(state, render.bpf_files(options.options) if status.engine == "bpf" else files)
        status.next_kernel, status.next_boot = platform.next_kernel, next_boot(platform, state)
        if status.engine == "bpf" and platform.next_kernel:  # one object for every kernel: no per-kernel build
            version = kernel_version(platform.next_kernel)
            status.next_boot = ("the eBPF engine" if version and version >= BPF_MIN_KERNEL
                                else f"NO engine: {platform.next_kernel} is older than 5.10")
        say("done")
    except Exception as exc:  # noqa: BLE001 - one host's failure is that host's row alone
        status.error = _describe_failure(exc)
        say("failed")
    finally:
        if host is not None:
            host.close()
    return status


def status(nodes: list[Node], options: DeployOptions, *, parallel: int = 5,
           progress: Progress | None = None) -> list[HostStatus]:
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda node: status_host(node, options, progress), nodes))
