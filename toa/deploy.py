"""Roll toa.ko (or the eBPF engine) out to hosts over SSH and keep it running across reboots.

Shaped like pyinfra: a *fact* is one shell command whose output a pure function parses (tested
offline on recorded output); the *plan* compares what a host has with what it should have and lists
only the steps that close the gap, so a second run finds nothing to do and says so.

Per host, over one SSH connection, one request per phase:

- the facts (facts_command): whether the login is root (else `sudo -n`, where the nodes file allows
  it), the platform, the module and engine state, the other kernels' toa.ko and the preflight's
  reading of the kernel's tree, in one command. The host's target is not known before its platform
  is parsed, so the command reads every target's module path for `uname -r` and every file any
  target's deploy writes; parse_facts keeps the host's own.
- the plan (make_plan: pure), then the apply (apply_script): one script per host, with toa.ko (and
  the other kernels' builds) on the same command's stdin, that
  1. checks the upload whole (size and sha256), then each file in it against the artifact's sha256;
  2. puts toa.ko in place as every file is (see below), the current toa.ko hard-linked to
     toa.ko.prev just before the rename; depmod -a;
  3. loads it (rmmod first when another build or other options are loaded) and verifies: the kernel
     log after a marker written to /dev/kmsg says `TOA: toa loaded`, /sys/module/toa exists, its
     srcversion is the artifact's and its parameters are the wanted ones;
  4. writes the autoload files from toa.render, and toa.ko for the other kernels;
  and, when a step fails, runs the undo of every step it started, in reverse. The script runs in a
  session of its own with SIGHUP and SIGPIPE ignored and its output in a log on the host: a
  connection dropped under it stops neither the script nor its rollback, and the one reconnect
  reads the outcome from that log. `--dry-run --json` shows the script a run would send.

Every file deploy writes (toa.ko, autoload files, shared files like /etc/modules merged, and the
rollback's restores) goes through one script (_replace_script): a symlinked path is written where it
points (readlink -f on the host); the new content goes to a temp name beside that target
(`.<name>.toa-new-<random>`, toa.ko's `.toa.ko.new-<random>`), whose sha256 must equal the one
computed here before anything else happens; the temp takes the target's owner and SELinux label (and
mode, for a shared file; a file toa owns gets its own mode); then sync, rename over the target, sync.
Any failing step (a full disk included) fails the host, and the temp name is removed. A power cut
leaves each file old or new and whole; the only leftovers it can leave are temp names, which depmod
ignores (they do not end in .ko) and the next run deletes; the apply's directory is a plain upload
under /tmp. Any failure rolls back: the previous toa.ko and autoload files are put back, depmod runs
again, and the previously loaded build is loaded again the way the host loads it (modprobe, or
insmod of its file where it lives outside /lib/modules) or none stays loaded if none was.

The eBPF engine (--engine bpf, or auto where the host can run it: choose_engine) goes the same way
with its own plan (make_bpf_plan): the static loader installed like toa.ko, toa-bpf.service and its
wants link written like the autoload files, the module's autoload files removed and toa.ko unloaded,
then the unit started and `toa-bpf status` checked, step by step from here (a command each), with
the rollback run from here too. Its facts come in the same facts round trip.
One engine at a time: each plan takes the other engine away before its own starts, and a rollback
stops the engine this run started before it brings back the one the host had.

Every remote command has a time limit (DeployOptions.command_timeout; the apply script as a whole);
connecting has SshOptions.timeout. A host that stops answering fails with the phase it was at; the
apply's outcome is then read through one reconnect (with the connect timeout), and a host that does
not come back holds only whole files, which the next run completes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
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

from toa import artifacts, build, detect, engine_bpf, preflight, remote, render, targets
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
STAGING_PREFIX = "/tmp/toa-deploy."  # + random: an upload's directory (the apply's: upload, script, log)
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[A-Za-z0-9]{8,32}")
# The staging directories of earlier runs (root's): one whose apply ended (its connection was lost,
# its outcome read or never read) or whose apply's process is gone (the host rebooted or it was
# killed) is stale; one whose apply still runs is busy, and no second apply starts beside it.
# $d/pid holds the apply's pid and the boot it runs in; a directory without one is an hour old.
_STAGING_STALE_LINE = "\n".join([
    f'b=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null); for o in {STAGING_PREFIX}*; do',
    '  [ -d "$o" ] && [ ! -L "$o" ] && [ -O "$o" ] || continue',
    '  if grep -qs "^@@end" "$o/log"; then echo "@@stale $o"',
    '  elif p=; ob=; read -r p ob 2>/dev/null < "$o/pid"; [ -n "$p" ]; then',
    '    if [ "$ob" = "$b" ] && kill -0 "$p" 2>/dev/null; then echo "@@busy $o"; else echo "@@stale $o"; fi',
    '  elif [ -n "$(find "$o" -maxdepth 0 -mmin +60)" ]; then echo "@@stale $o"; fi',
    "done"])
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
    busy: list[str] = field(default_factory=list)  # staging directories of applies still running
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


def _module_lines(module: str, temp_prefix: str, modules_dep: str | None, entry: str | None) -> list[str]:
    """The state lines of one module path. Shell words: MODULE and TEMP_PREFIX expand to the path and
    its temp names' prefix, MODULES_DEP to the modules.dep that indexes ENTRY (None: not indexed)."""
    q = shlex.quote
    lines = [
        f"m={module}",
        'if [ -f "$m" ]; then echo "@@installed $(sha256sum < "$m" | cut -d" " -f1) '
        '$(modinfo -F srcversion "$m" 2>/dev/null)"; fi',
    ]
    if entry is not None:
        lines.append(f"grep -qs {q('^' + re.escape(entry) + ':')} {modules_dep} && echo @@indexed")
    # temp names beside the path and, for a symlink written where it points, beside its target
    lines.append(
        'f=$m; r=$(readlink -f -- "$f" 2>/dev/null) || r=$f; '
        'if [ "$r" != "$f" ]; then echo "@@resolved m $(printf %s "$r" | base64 -w0)"; fi; '
        f'for t in {temp_prefix}* "$(dirname -- "$r")/.$(basename -- "$r")"{q(MODULE_TEMP_MARK)}*; do '
        'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')
    return lines


def _file_lines(files: list[AutoloadFile]) -> list[str]:
    """The state lines of FILES (numbered in their order): content, mode, link target, temp names.
    The files of a directory the host lacks are absent at the cost of one test (a fresh host has
    none of toa's source directory)."""
    q = shlex.quote
    by_directory: dict[str, list[tuple[int, AutoloadFile]]] = {}
    for index, f in enumerate(files):
        by_directory.setdefault(posixpath.dirname(f.path), []).append((index, f))
    lines = []
    for directory, entries in by_directory.items():
        lines.append(f"if [ -d {q(directory)} ]; then")
        for index, f in entries:
            lines += [_file_stale_line(index, f), _file_read_line(index, f)]
        lines += ["else", *(f"echo '@@absent {index}'" for index, _f in entries), "fi"]
    return lines


def _file_stale_line(index: int, f: AutoloadFile) -> str:
    """Temp names beside the path and, for a symlink written where it points, beside its target
    (globs: the quoted fixed part, then an unquoted *)."""
    q = shlex.quote
    if f.kind == "symlink":
        return (f"for t in {q(_temp_prefix(f.path))}*; do "
                'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')
    return (f'f={q(f.path)}; r=$(readlink -f -- "$f" 2>/dev/null) || r=$f; '
            f'if [ "$r" != "$f" ]; then echo "@@resolved {index} $(printf %s "$r" | base64 -w0)"; fi; '
            f'for t in {q(_temp_prefix(f.path))}* "$(dirname -- "$r")/.$(basename -- "$r")"{q(FILE_TEMP_MARK)}*; do '
            'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')


def _file_read_line(index: int, f: AutoloadFile) -> str:
    q = shlex.quote
    if f.kind == "symlink":
        return (f"f={q(f.path)}; "
                f'if [ -L "$f" ]; then echo "@@symlink {index} $(printf %s "$(readlink "$f")" | base64 -w0)"; '
                f'elif [ -f "$f" ]; then echo "@@file {index} $(stat -c %a "$f") $(base64 -w0 < "$f")"; '
                f'else echo "@@absent {index}"; fi')
    # read through a symlink: the file it points to is the one deploy edits
    return (f"f={q(f.path)}; "
            f'if [ -f "$f" ]; then echo "@@file {index} $(stat -L -c %a "$f") $(base64 -w0 < "$f")"; '
            f'else echo "@@absent {index}"; fi')


_LOADED_LINES = [
    'if [ -d /sys/module/toa ]; then echo "@@loaded $(cat /sys/module/toa/srcversion 2>/dev/null)"; fi',
    'for p in /sys/module/toa/parameters/*; do [ -r "$p" ] && echo "@@parameter ${p##*/} $(cat "$p")"; done',
]


def state_command(module_file: str, release: str, files: list[AutoloadFile],
                  others: tuple[tuple[str, str], ...] = ()) -> str:
    """One command that prints a host's module state as @@-tagged lines (see parse_state); OTHERS:
    (release, module file) of the other kernels whose toa.ko is wanted too."""
    q = shlex.quote
    entry = modules_dep_entry(module_file, release)
    lines = [PATH_SETTING, *_LOADED_LINES,
             *_module_lines(q(module_file), q(_temp_prefix(module_file, MODULE_TEMP_MARK)),
                            q(f"/lib/modules/{release}/modules.dep"), entry),
             *_file_lines(files)]
    for other, other_file in others:
        # toa's own file, else any toa.ko that kernel has (a DKMS or kmod package's)
        lines.append(
            f"f={q(other_file)}; if [ -f \"$f\" ]; then echo \"@@other {q(validate_release(other))} "
            f'$(sha256sum < "$f" | cut -d" " -f1) $f"; else p=$(find {q(f"/lib/modules/{other}")} '
            f"-name 'toa.ko*' 2>/dev/null | head -n 1); echo \"@@other {q(other)} - ${{p:--}}\"; fi")
    return "\n".join(lines) + "\ntrue\n"


# ---------------------------------------------------------------- facts: everything in one round trip

# A release that stands for the host's own in the paths the facts command reads before it knows which
# target the host is: replaced by the shell's $kr (its `uname -r`, checked) or $o (another kernel's).
RELEASE_SLOT = "0.0.0-toa-release-slot"
STATE_BEGINS = "@@toa-state-begins"
TREE_BEGINS = "@@toa-tree-begins"
_SHELL_SAFE_PATH = re.compile(r"[A-Za-z0-9/._+-]+")


def _release_path(path: str, variable: str) -> str:
    """PATH (rendered for RELEASE_SLOT) as a double-quoted shell word in which $VARIABLE is the release."""
    if not _SHELL_SAFE_PATH.fullmatch(path):
        raise ToaError(f"toa renders an unexpected module path {path!r}: please report it")
    return '"' + path.replace(RELEASE_SLOT, "${" + variable + "}") + '"'


@functools.lru_cache(maxsize=1)
def module_layouts() -> tuple[str, ...]:
    """Where toa.ko lives on a host of any target, rendered for RELEASE_SLOT."""
    return tuple(sorted({render.module_path(t, RELEASE_SLOT) for t in targets.all_targets().values()}))


@functools.lru_cache(maxsize=1)
def readable_files() -> tuple[AutoloadFile, ...]:
    """Every file a deploy or status may look at on a host of any target and init: the autoload files,
    the kernel hooks' module sources and the eBPF engine's boot files (one entry per path)."""
    found: dict[str, AutoloadFile] = {}
    for target in targets.all_targets().values():
        for init in render.INITS:
            try:
                entries = render.autoload_files(target, RELEASE_SLOT, init=init)
            except ToaError:  # a target that loads modules only through systemd, without it
                continue
            for entry in entries + render.hook_sources(target):
                found.setdefault(entry.path, entry)
    for entry in render.bpf_files():
        found.setdefault(entry.path, entry)
    return tuple(found.values())


def _release_path_text(text: str, variable: str) -> str:
    """TEXT (a script written for RELEASE_SLOT, which it never quotes) with $VARIABLE for the release."""
    return text.replace(RELEASE_SLOT, "${" + variable + "}")


def facts_command(sudo: bool, symbols: tuple[str, ...] = ()) -> str:
    """One command for everything a deploy or status reads on a host (see parse_facts): whether it
    runs as root (else through `sudo -n`, where SUDO allows it), the platform
    (detect.REMOTE_FACTS_COMMAND) and, as root, the module and engine state. Which target the host is
    cannot be known before the platform is parsed, so the state covers every target's module path
    (each under an @@module line) for the running kernel, every other installed kernel's toa.ko, and
    every file any target's deploy writes; with SYMBOLS, the preflight's reading of the running
    kernel's tree for those symbols (preflight.host_tree_command) after a TREE_BEGINS line."""
    q = shlex.quote
    modules = []
    for layout in module_layouts():
        entry = modules_dep_entry(layout, RELEASE_SLOT)
        modules += [f'echo "@@module "{_release_path(layout, "kr")}',
                    *_module_lines(_release_path(layout, "kr"),
                                   _release_path(_temp_prefix(layout, MODULE_TEMP_MARK), "kr"),
                                   '"/lib/modules/$kr/modules.dep"', entry)]
    own = " ".join(_release_path(layout, "o") for layout in module_layouts())
    state = "\n".join([
        PATH_SETTING,
        # a release that is not one (detect refuses it too) reads nothing
        'kr=$(uname -r); case "$kr" in ""|*[!A-Za-z0-9._+~-]*|*..*) kr=not-a-release;; esac',
        *_LOADED_LINES, *modules, "echo '@@module -'",
        *_file_lines(list(readable_files())), _STAGING_STALE_LINE,
        # every other kernel's toa.ko: toa's own file (any target's place), else any toa.ko it has
        # (a DKMS or kmod package's)
        'seen=" $kr "; for d in /lib/modules/* /usr/lib/modules/*; do o=${d##*/}; '
        'case "$o" in ""|*[!A-Za-z0-9._+~-]*|*..*) continue;; esac; '
        'case "$seen" in *" $o "*) continue;; esac; seen="$seen$o "; [ -d "$d" ] || continue; p=; '
        f'for f in {own}; do if [ -f "$f" ]; then p=$f; break; fi; done; '
        'if [ -n "$p" ]; then echo "@@other $o $(sha256sum < "$p" | cut -d" " -f1) $p"; '
        "else p=$(find \"$d\" -name 'toa.ko*' 2>/dev/null | head -n 1); echo \"@@other $o - ${p:--}\"; fi; done",
        bpf_state_command(),
        *([f"echo {TREE_BEGINS}", "(", _release_path_text(preflight.host_tree_command(RELEASE_SLOT, list(symbols)), "kr"),
           ")"] if symbols else []),
        "true", ""])
    become = (f'elif sudo -n true 2>/dev/null; then echo {STATE_BEGINS}; sudo -n sh -c "$s"; '
              'else echo @@toa-nosudo; fi' if sudo else "else echo @@toa-notroot; fi")
    return "\n".join([
        'echo "@@toa-uid $(id -u)"',
        detect.REMOTE_FACTS_COMMAND,
        f"s={q(state)}",
        f'if [ "$(id -u)" = 0 ]; then echo {STATE_BEGINS}; sh -c "$s"',
        become, ""])


class HostRefused(ToaError):
    """The host is what toa cannot deploy to (not root without sudo, an unsupported platform): said as it is."""


@dataclass
class Facts:
    """What one facts_command told: the platform, whether toa runs commands as root through sudo,
    and the state for the host's own target (module path, other kernels)."""

    platform: detect.Platform
    sudo: bool
    state: ModuleState
    tree: str | None = None  # the preflight's reading of the kernel's tree, where asked (parse_host_tree's input)
    symbols: tuple[str, ...] = ()  # the symbols it was read for


def parse_facts(output: str, user: str, symbols: tuple[str, ...] = ()) -> Facts:
    """Parse facts_command's output from a host reached as USER. Pure; a host where toa cannot
    become root is a one-line ToaError."""
    head, begins, state_text = output.partition(f"\n{STATE_BEGINS}\n")
    if not begins and output.startswith(STATE_BEGINS + "\n"):
        head, begins, state_text = "", True, output[len(STATE_BEGINS) + 1:]
    uid = next((line.split()[1] for line in head.splitlines()
                if line.startswith("@@toa-uid ") and len(line.split()) == 2), None)
    if "\n@@toa-notroot" in "\n" + head:
        raise HostRefused(f"{user} is not root and sudo=no for this host: connect as root or set sudo=yes in the nodes file")
    if "\n@@toa-nosudo" in "\n" + head:
        raise HostRefused(f"{user} cannot run `sudo -n` without a password: allow it in sudoers or connect as root")
    if uid is None or not begins:
        raise ToaError("the facts command printed no state: is the login shell a POSIX shell?")
    platform = detect.identify(detect.parse_remote_facts(head))
    validate_release(platform.kernel or "")
    if platform.target is None:
        raise HostRefused(f"{platform.support}; toa cannot tell how it loads modules at boot")
    module_file = render.module_path(platform.target, platform.kernel)
    state_text, tree_begins, tree = state_text.partition(f"{TREE_BEGINS}\n")
    state = parse_state(state_text, list(readable_files()), module_file)
    for release, (sha, path) in list(state.others.items()):
        if sha is not None and path != render.module_path(platform.target, release):
            state.others[release] = (None, path)  # another target's place: a toa.ko, not toa's own here
    return Facts(platform, uid != "0", state, tree if tree_begins else None, symbols if tree_begins else ())


def _unbase64(text: str, what: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ToaError(f"{what} is not base64 of text") from None


def parse_state(output: str, files: list[AutoloadFile], module_file: str | None = None) -> ModuleState:
    """Parse state_command's output (or the state part of facts_command's). Pure. Lines without a tag
    (a login banner, ...) are ignored; a tagged line that is not what state_command prints is a
    ToaError. Lines about a module path come after an `@@module PATH` line where the command read
    several: only MODULE_FILE's count."""
    state = ModuleState(files={f.path: None for f in files})
    section = None  # the module path the lines read are about; "-": past them all

    def entry(word: str) -> AutoloadFile:
        if not word.isdigit() or int(word) >= len(files):
            raise ToaError(f"no autoload file number {word[:20]!r}")
        return files[int(word)]

    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if not tag.startswith("@@"):
            continue
        words = rest.split()
        if tag == "@@module" and rest:
            section = rest
            continue
        if section not in (None, "-", module_file) and (
                tag in ("@@installed", "@@indexed", "@@stale") or (tag == "@@resolved" and words[:1] == ["m"])):
            continue  # another target's module path
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
    elif tag == "@@busy" and rest:
        state.busy.append(rest)
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
    script: str | None = None  # a dry run's: the apply script a run would send (apply_script)

    def as_dict(self) -> dict:
        return {"host": self.host, "kernel": self.kernel, "action": self.action, "detail": self.detail,
                "changes": self.changes, "engine": self.engine, "script": self.script}


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

    def __init__(self, node: Node, ssh: remote.SshOptions, command_timeout: float, sudo: str = ""):
        self.node, self.ssh, self.command_timeout = node, ssh, command_timeout
        self.lost = False
        self.sudo = sudo  # "sudo -n " once the facts said the login is not root (read_facts)
        key = str(node.key) if node.key else ssh.key_filename
        self.conn = remote.connect(node.spec, dataclasses.replace(ssh, key_filename=key))
        try:
            remote.limit(self.conn, command_timeout)
        except BaseException:
            self.conn.close()
            raise

    def reconnect(self) -> Host:
        """A new connection to the same host after this one was lost: one attempt, with a connect
        timeout of at most RECONNECT_SECONDS."""
        self.close()
        ssh = dataclasses.replace(self.ssh, timeout=min(self.ssh.timeout, RECONNECT_SECONDS))
        return Host(self.node, ssh, self.command_timeout, self.sudo)

    def read_facts(self, symbols: tuple[str, ...] = ()) -> Facts:
        """The platform and state in one round trip (facts_command, with the preflight's reading for
        SYMBOLS); root or sudo settled by it."""
        user = self.node.spec.user or self.conn.user
        output = self.run_as_user(facts_command(self.node.sudo, symbols), "reading the facts")
        facts = self.parse("reading the facts", lambda text: parse_facts(text, user, symbols), output)
        self.sudo = "sudo -n " if facts.sudo else ""
        return facts

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

    def stream(self, command: str, stdin: bytes, what: str, on_line) -> remote.Result:
        return self._call(what, lambda: remote.run_streaming(self.conn, command, stdin, what, on_line))

    def put(self, local: Path, path: str) -> None:
        self._call("upload", lambda: remote.put(self.conn, str(local), path))

    def parse(self, what: str, parser: Callable, output: str):
        """PARSER(OUTPUT); output it cannot make sense of is a ToaError naming the host and WHAT."""
        try:
            return parser(output)
        except HostRefused:
            raise
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


def _preflight(host: Host, artifact: Artifact, release: str, facts: Facts) -> None:
    """Refuse, before anything is uploaded, a module the host's kernel would not load: the build's
    preflight checks against what the host has of its kernel's tree (build tree or /boot files), as
    the facts read it (else in a round trip of its own: a module importing symbols they did not ask)."""
    module = preflight.read_module(artifact.ko.read_bytes())
    if facts.tree is not None and set(module.crcs) <= set(facts.symbols):
        output = facts.tree
    else:
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


# ---------------------------------------------------------------- the apply: one script per host

# Seconds a reconnect waits for the log of an apply the lost connection left running.
COLLECT_SECONDS = 60


@dataclass(frozen=True)
class Payload:
    """A file the apply carries on its stdin, before the script: bytes OFFSET.. of the upload."""

    local: Path
    sha256: str
    offset: int
    size: int


@dataclass(frozen=True)
class ApplyScript:
    """The script that applies a plan on one host, and the files it carries."""

    text: str
    payloads: tuple[Payload, ...]

    def upload(self) -> bytes:
        """What the apply command reads on its stdin: the payloads, then the script."""
        return b"".join(payload.local.read_bytes() for payload in self.payloads) + self.text.encode()


# The apply command: runs as root with the upload on stdin (see run_apply). It checks the upload
# whole, then starts the script in its own session with its output in a log, SIGHUP and SIGPIPE
# ignored: a connection dropped from here on stops neither the script nor its rollback, and the log
# is where a reconnect reads the outcome. The log streams back while the connection lives.
_APPLY_COMMAND = "\n".join([
    PATH_SETTING, "umask 077",
    f'd={STAGING_PREFIX}$1; mkdir -m 700 -- "$d" || {{ echo "cannot create $d" >&2; exit 1; }}',
    'b=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null); echo "$$ $b" > "$d/pid"',
    'cat > "$d/in"',
    'if [ "$(wc -c < "$d/in")" -ne "$2" ] || [ "$(sha256sum < "$d/in" | cut -d" " -f1)" != "$3" ]; then',
    '  rm -rf -- "$d"; echo "the upload arrived damaged or cut short: run again" >&2; exit 1',
    "fi",
    'tail -c +"$(($4 + 1))" "$d/in" > "$d/apply.sh"',
    "trap '' HUP PIPE",
    'if command -v setsid >/dev/null 2>&1; then setsid sh "$d/apply.sh" "$d" > "$d/log" 2>&1 < /dev/null &',
    'else sh "$d/apply.sh" "$d" > "$d/log" 2>&1 < /dev/null & fi',
    'pid=$!; echo "$pid $b" > "$d/pid"',
    # a tail without --pid (not GNU's) fails at once: the log is printed whole at the end instead
    'if tail -s 0.05 -n +1 -f --pid="$pid" "$d/log"; then wait "$pid"; else wait "$pid"; cat -- "$d/log"; fi',
    # the log stays for a reconnect unless this end can still say it was read to its end
    'rm -f -- "$d/in" "$d/apply.sh"; if echo @@toa-collected; then rm -rf -- "$d"; fi',
    ""])


def _collect_command(token: str) -> str:
    """After a lost connection: wait for the apply's log to end, print it, then remove its directory."""
    return "\n".join([
        f"d={STAGING_PREFIX}{token}; i=0",
        f'while [ $i -lt {COLLECT_SECONDS} ] && ! grep -qs "^@@end" "$d/log"; do sleep 1; i=$((i + 1)); done',
        'cat -- "$d/log" 2>/dev/null; if grep -qs "^@@end" "$d/log"; then rm -rf -- "$d"; fi; true', ""])


def _load_check_script(artifact: Artifact, parameters: dict[str, str]) -> str:
    """The script's own check of a load (check_load's, in the shell: the rollback is decided there);
    $d/load holds load_command's output."""
    q = shlex.quote
    lines = [
        'if grep -q "^@@rmmod" "$d/load"; then exit 1; fi',
        'grep -qx "@@exit 0" "$d/load" || exit 1',
        f'grep "^@@log " "$d/load" | grep -qF {q(LOADED_MESSAGE)} || exit 1',
        f'[ "$(cat /sys/module/toa/srcversion 2>/dev/null)" = {q(artifact.srcversion)} ] || exit 1',
    ]
    lines += [f'[ "$(cat /sys/module/toa/parameters/{name} 2>/dev/null)" = {q(value)} ] || exit 1'
              for name, value in parameters.items()]
    return "\n".join(lines)


def _install_script(payload: Payload, name: str, path: str, mark: str = MODULE_TEMP_MARK, mode: int = 0o644) -> str:
    """Put the upload's PAYLOAD at PATH, the file it replaces kept as PATH.prev (see _restore_module_script)."""
    staged = f'"$d/{name}"'
    return "\n".join([
        f"tail -c +{payload.offset + 1} \"$d/in\" | head -c {payload.size} > {staged}",
        f'[ {_sha_of(staged[1:-1])} = {payload.sha256} ] || '
        f'{{ echo "the uploaded {name} has another sha256 than the artifact: run again" >&2; exit 1; }}',
        _replace_script(path, create=f'cat -- {staged} > "$tmp"', check=f'[ {_sha_of("$tmp")} = {payload.sha256} ]',
                        same=f'[ -f "$t" ] && [ {_sha_of("$t")} = {payload.sha256} ]', mode=mode, mark=mark,
                        before_rename='if [ -f "$t" ]; then ln -f -- "$t" "$t.prev" || fail "cannot keep $t as $t.prev"; fi'),
    ])


def apply_script(plan: Plan, artifact: Artifact, module_file: str, parameters: dict[str, str],
                 state: ModuleState, others: list[OtherKernel] = ()) -> ApplyScript:
    """The one script that applies PLAN (and toa.ko for OTHERS) on a host in STATE, with the rollback
    of the steps it started in the same script. Each step runs in a subshell (set -e holds there);
    the first that fails stops the rest, and the undo of every step started runs in reverse. Its
    output: `@@step NAME` as each step starts, load_command's lines, `@@failed WHAT` and the error
    lines, `@@undo-failed WHAT: WHY`, then `@@result ok|rolled-back|rollback-incomplete` and `@@end`."""
    q = shlex.quote
    payloads, offset = [], 0
    for local, sha in [(artifact.ko, artifact.sha256)] * plan.install + [(o.artifact.ko, o.artifact.sha256) for o in others]:
        size = local.stat().st_size
        payloads.append(Payload(local, sha, offset, size))
        offset += size
    done = _Done(installed=plan.install, load_attempted=bool(plan.load), files=list(plan.files),
                 others=[(o.module_file, o.release, o.replaces) for o in others], bpf_changed=plan.detach_bpf)
    flags: dict[str, str] = {}  # a step's key (see _done_keys) -> its shell flag

    def flag(key: str) -> str:
        return flags.setdefault(key, f"s{len(flags)}")

    lines = [f"# toa {artifact.srcversion} for {artifact.release}: applied by `invoke deploy` as one script",
             PATH_SETTING, 'd=$1; failed=', "trap 'failed=1; echo \"@@failed terminated\"' TERM INT", ""]

    def step(name: str, what: str, script: str, key: str | None = None, check: str = "") -> None:
        """SCRIPT as a step; with CHECK, its output is kept in $d/load for CHECK, which decides."""
        lines.extend([f"# {what}", 'if [ -z "$failed" ]; then', f"echo {q('@@step ' + name)}"])
        if key:
            lines.append(f"{flag(key)}=1")
        lines.extend(["(", script.rstrip("\n"), ")"])
        if check:
            lines[-1] += ' > "$d/load" 2>&1'
            lines.extend(['cat "$d/load"', "(", check, ")"])
        lines.extend([f'[ $? -eq 0 ] || {{ failed=1; echo {q("@@failed " + what)}; }}', "fi", ""])

    if plan.stale:
        step("stale", "removing temp files of an interrupted run",
             f"rm -rf -- {' '.join(q(path) for path in plan.stale)}\nsync")
    if plan.install:
        step("upload", f"installing {posixpath.basename(module_file)}", _install_script(payloads[0], "toa.ko", module_file),
             "install")
        lines.extend(['[ -n "$failed" ] || echo "@@step installed"', ""])
    if plan.depmod:
        step("depmod", "depmod", f"depmod -a {q(artifact.release)}")
    if plan.detach_bpf:
        step("detach bpf", "detaching the eBPF engine", _detach_bpf_script(), "bpf")
    if plan.load:
        marker = f"toa-deploy: load {secrets.token_hex(8)}"
        # every wanted parameter on the command line: they come after, and win over, any options
        # an older /etc/modprobe.d/toa.conf still gives until the autoload files are rewritten
        load = load_command(module_file, artifact.release, render.module_options(parameters), marker,
                            reload=plan.load == "reload")
        step(plan.load, f"{plan.load} toa", load, "load", check=_load_check_script(artifact, parameters))
    for change in plan.files:
        if change.text is None:
            script = _remove_file_script(change.entry.path, resolve=_writes(change.entry)["resolve"])
        else:
            kind = "symlink" if change.entry.kind == "symlink" else "file"
            script = _write_file_script(change.entry.path, kind, change.text, change.entry.mode, **_writes(change.entry))
        step("autoload", f"{'removing' if change.text is None else 'writing'} {change.entry.path}", script,
             f"file:{change.entry.path}")
    if plan.detach_bpf:
        step("daemon-reload", "systemctl daemon-reload", "systemctl daemon-reload")
    for index, other in enumerate(others, start=int(plan.install)):
        depmod = f"depmod -a {q(other.release)}" if modules_dep_entry(other.module_file, other.release) else ""
        step("other kernel", f"installing toa.ko for {other.release}",
             _install_script(payloads[index], f"toa-{index}.ko", other.module_file) + f"\n{depmod}",
             f"other:{other.module_file}")

    lines.extend(["rollback() {", "  r=rolled-back"])
    for what, script, needs in _undo_steps(state, module_file, artifact.release, done):
        started = " || ".join(f'[ -n "${flag(key)}" ]' for key in needs)
        lines.extend([f"  # {what}", f"  if {started}; then", f"    echo {q('@@undo ' + what)}", "    (",
                      script().rstrip("\n"), '    ) > "$d/undo" 2>&1',
                      f'    [ $? -eq 0 ] || {{ r=rollback-incomplete; echo "@@undo-failed {what}: '
                      '$(tail -n 1 "$d/undo" | tr -d "\\n")"; }', "  fi"])
    lines.extend(["  echo \"@@result $r\"", "}", "",
                  'if [ -n "$failed" ]; then rollback; else echo "@@result ok"; fi', "sync", "echo @@end", ""])
    return ApplyScript("\n".join(lines), tuple(payloads))


@dataclass(frozen=True)
class ApplyOutcome:
    result: str | None  # ok, rolled-back, rollback-incomplete; None: the log ended before a result
    failed: str | None  # the step that failed
    reason: str  # its last error line
    load: str  # load_command's lines
    undo_problems: tuple[str, ...]


_LOAD_TAGS = ("@@rmmod", "@@exit", "@@modprobe", "@@srcversion", "@@parameter", "@@log")


def parse_apply(log: str) -> ApplyOutcome:
    """The outcome apply_script's log tells. Pure."""
    result = failed = None
    reason, last_error, load, problems = "", "", [], []
    for line in log.splitlines():
        tag, _, rest = line.partition(" ")
        if tag in _LOAD_TAGS:
            load.append(line)
        elif tag == "@@failed" and failed is None:
            failed, reason = rest, last_error
        elif tag == "@@undo-failed":
            problems.append(rest)
        elif tag == "@@result" and rest in ("ok", "rolled-back", "rollback-incomplete"):
            result = rest
        elif not tag.startswith("@@") and line.strip():
            last_error = line.strip()
    return ApplyOutcome(result, failed, reason, "\n".join(load), tuple(problems))


class ApplyFailed(ToaError):
    """The apply script failed on the host; the message says what, and what its rollback did."""


def outcome_error(outcome: ApplyOutcome, artifact: Artifact, parameters: dict[str, str]) -> str | None:
    """One line for a failed apply (None: it worked): the failed step and why, then the rollback. Pure."""
    if outcome.result == "ok":
        return None
    if outcome.result is None:
        return "the apply script ended without a result: check the host, then run again"
    why = f"{outcome.failed}: {outcome.reason}" if outcome.reason else f"{outcome.failed} failed"
    if outcome.failed and outcome.failed.endswith(" toa"):  # the load: say it as check_load does
        try:
            check_load(parse_load(outcome.load), artifact, parameters)
            why = f"{outcome.failed}: the load did not verify on the host"
        except ToaError as exc:
            why = str(exc)
    if outcome.result == "rolled-back":
        return f"{why}; rolled back"
    return f"{why}; rollback incomplete: " + "; ".join(outcome.undo_problems)


def run_apply(host: Host, script: ApplyScript, say) -> tuple[Host, str]:
    """Run SCRIPT on HOST as one command, its files on stdin; (the host, maybe reconnected, and the
    script's log). A connection lost under it is reconnected once and the log read there."""
    token = secrets.token_hex(8)
    upload = script.upload()
    offset = sum(payload.size for payload in script.payloads)
    command = (f"{host.sudo}sh -c {shlex.quote(_APPLY_COMMAND)} toa-apply {token} {len(upload)} "
               f"{hashlib.sha256(upload).hexdigest()} {offset}")

    def on_line(line: str) -> None:
        if line.startswith("@@step "):
            say(line[len("@@step "):])

    try:
        ran = host.stream(command, upload, "applying the plan", on_line)
    except remote.ConnectionLost as lost:
        say("reconnect")
        try:
            host = host.reconnect()
        except Exception as again:  # noqa: BLE001 - the host is gone: the outcome is unknown here
            raise ApplyFailed(f"{lost}; the apply goes on on the host to its end or its rollback, and reconnecting "
                              f"to read its outcome failed ({_describe_failure(again)}): run deploy again") from None
        try:
            log = host.run_as_root(_collect_command(token), "reading the outcome of the apply")
        except Exception as again:  # noqa: BLE001
            host.close()
            raise ApplyFailed(f"{lost}; reading the outcome of the apply after reconnecting failed "
                              f"({_describe_failure(again)}): run deploy again") from None
        if "@@end" not in log.splitlines():
            host.close()
            raise ApplyFailed(f"{lost}; no outcome of the apply within {COLLECT_SECONDS} s of reconnecting: "
                              "run deploy again") from None
        return host, log
    if ran.exited != 0 and "@@end" not in ran.stdout.splitlines():
        tail = (ran.stderr or ran.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToaError(f"applying the plan failed on {host.node.name} (exit {ran.exited}): {tail[0]}")
    return host, ran.stdout


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
        host.run_as_root(f"rm -rf -- {' '.join(shlex.quote(path) for path in plan.stale)}\nsync\n",
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


def _plan_other_kernels(platform: detect.Platform, state: ModuleState, options: DeployOptions,
                        say) -> tuple[list[OtherKernel], list[str]]:
    """toa.ko for the other kernels options.kernels names (the next boot's, the installed ones), and
    notes on those without a build. A kernel that already has a toa.ko (toa's, or a DKMS or kmod
    package's) is left as it is."""
    installs, notes = [], []
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
        installs.append(OtherKernel(other, why, artifact, render.module_path(platform.target, other), own_sha))
    return installs, notes


def _done_keys(done: _Done) -> set[str]:
    """The names of the steps DONE started, as _undo_steps names what each undo needs."""
    keys = {f"file:{change.entry.path}" for change in done.files}
    keys |= {f"other:{other_file}" for other_file, _other, _old in done.others}
    keys |= {key for key, started in (("install", done.installed), ("load", done.load_attempted),
                                      ("loader", done.loader_installed), ("bpf", done.bpf_changed)) if started}
    return keys


def _undo_steps(state: ModuleState, module_file: str, release: str,
                done: _Done) -> list[tuple[str, Callable[[], str], tuple[str, ...]]]:
    """What puts back what DONE changes, in the order it runs: (what, its script, the steps of which
    any one started makes it needed; see _done_keys)."""
    steps: list[tuple[str, Callable[[], str], tuple[str, ...]]] = []
    if done.bpf_changed:  # first: never two engines, not even while rolling back
        steps.append(("detaching the eBPF engine", _detach_bpf_script, ("bpf",)))
    for other_file, other, old in reversed(done.others):
        steps.append((f"restoring toa.ko of {other}", partial(_restore_module_script, other_file, other, old),
                      (f"other:{other_file}",)))
    for change in reversed(done.files):
        previous, entry, key = change.previous, change.entry, (f"file:{change.entry.path}",)
        if previous is None:
            steps.append((f"removing {entry.path}",
                          partial(_remove_file_script, entry.path, resolve=_writes(entry)["resolve"]), key))
        else:
            steps.append((f"restoring {entry.path}", partial(_write_file_script, entry.path, previous.kind,
                                                             previous.text, previous.mode, **_writes(entry)), key))
    if done.installed:
        steps.append(("restoring the previous toa.ko",
                      partial(_restore_module_script, module_file, release, state.installed_sha256), ("install",)))
    if done.loader_installed:
        steps.append(("restoring the previous toa-bpf",
                      partial(_restore_module_script, render.BPF_LOADER, release, state.bpf.loader_sha256), ("loader",)))
    units = tuple(f"file:{change.entry.path}" for change in done.files if change.entry.path.startswith("/etc/systemd/"))
    if units:
        steps.append(("systemctl daemon-reload", lambda: f"{PATH_SETTING}\nsystemctl daemon-reload\n", units))
    if done.load_attempted:
        if state.loaded and state.loaded_srcversion:
            steps.append(("loading the previous toa again", partial(_reload_previous_script, module_file, release, state),
                          ("load",)))
        elif not state.loaded:
            steps.append(("unloading toa", lambda: f"{PATH_SETTING}\nif [ -d /sys/module/toa ]; then rmmod toa; fi\n",
                          ("load",)))
    if done.bpf_changed and state.bpf.active:
        steps.append(("attaching the previous eBPF engine again", partial(_reattach_previous_bpf_script, state), ("bpf",)))
    return steps


def _rollback(host: Host, state: ModuleState, module_file: str, release: str, done: _Done) -> list[str]:
    """Put back what DONE changed; the steps that could not be undone, as text. Never raises: a
    step's error, whatever it is, is that step's problem; once the connection is lost the steps
    left are not attempted."""
    problems: list[str] = []
    for what, script, _needs in _undo_steps(state, module_file, release, done):
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


def _read(host: Host, options: DeployOptions, say, symbols: tuple[str, ...] = ()):
    """Detect the host and read its state in one round trip (and the preflight's reading for
    SYMBOLS): (platform, release, module file, autoload files, state, facts)."""
    say("facts")
    facts = host.read_facts(symbols)
    platform, state, release = facts.platform, facts.state, facts.platform.kernel
    module_file = render.module_path(platform.target, release)
    # the kernel hooks' module sources too: a kernel installed later gets toa.ko built from them
    files = (render.autoload_files(platform.target, release, init=platform.init, options=options.options)
             + render.hook_sources(platform.target))
    return platform, release, module_file, files, state, facts


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
        platform, release, module_file, files, state, facts = _read(host, options, say, dist_symbols(options.dist))
        result.kernel = release
        if state.busy:
            raise ToaError(f"an earlier run's apply is still going on on {node.name} ({state.busy[0]}): "
                           "run deploy again once it has ended")
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
            _preflight(host, artifact, release, facts)
        others, notes = _plan_other_kernels(platform, state, options, say)
        result.changes = plan.describe(artifact) + [other.describe() for other in others]
        fresh = state.installed_sha256 is None and not state.loaded
        if plan.empty:
            result.action, result.detail = "unchanged", f"toa {artifact.srcversion} loaded, nothing to do"
            if others:
                result.action = "would-update" if options.dry_run else "updated"
        elif options.dry_run:
            result.action = "would-install" if fresh else "would-update"
            result.detail = "; ".join(plan.describe(artifact))
        else:
            result.action = "installed" if fresh else "updated"
            result.detail = f"toa {artifact.srcversion} loaded; " + "; ".join(plan.describe(artifact))
        if not plan.empty or others:
            script = apply_script(plan, artifact, module_file, parameters, state, others)
            if options.dry_run:
                result.script = script.text
            else:
                host, log = run_apply(host, script, say)
                failure = outcome_error(parse_apply(log), artifact, parameters)
                if failure:
                    raise ApplyFailed(failure)
        added = [other.describe() for other in others]
        if added or notes:
            result.detail = "; ".join(part for part in (result.detail, *added, *notes) if part)
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
        platform, release, _module_file, files, state, _facts = _read(host, options, say)
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
