"""What a host has: the facts, one command per host, and their pure parsers.

facts_command reads, in one round trip: whether the login is root (else `sudo -n`, where the nodes
file allows it), the platform, the module and engine state, the other kernels' toa.ko and the
preflight's reading of the kernel's tree. The host's target is not known before its platform is
parsed, so the command reads every target's module path for `uname -r` and every file any target's
deploy writes; parse_facts keeps the host's own. The command then waits on its input: given an
apply line and the upload, it runs APPLY_COMMAND on the same channel (Host.apply). state_command
prints the state part alone, for one module path and the files given.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from toa import artifacts, detect, preflight, render, targets
from toa.errors import ToaError
from toa.kernel import validate_release
from toa.render import AutoloadFile

PATH_SETTING = "PATH=/usr/sbin:/usr/bin:/sbin:/bin; export PATH"
STAGING_PREFIX = "/tmp/toa-deploy."  # + random: an upload's directory (the apply's: upload, script, log)
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[A-Za-z0-9]{8,32}")
# The staging directories of earlier runs (root's): one whose apply ended (its connection was lost,
# its outcome read or never read) or whose apply's process is gone (the host rebooted or it was
# killed) is stale; one whose apply still runs is busy, and no second apply starts beside it.
# $d/pid holds the apply's pid and the boot it runs in; a directory without one is an hour old.
# STAGING_KIND defines `staging DIR`, which prints stale, busy or nothing for DIR ($b: this boot's id).
STAGING_KIND = "\n".join([
    "b=; read -r b < /proc/sys/kernel/random/boot_id 2>/dev/null",
    "staging() {",
    '  [ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ] || return 0',
    '  if grep -qs "^@@end" "$1/log"; then echo stale',
    '  elif p=; ob=; read -r p ob 2>/dev/null < "$1/pid"; [ -n "$p" ]; then',
    '    if [ "$ob" = "$b" ] && kill -0 "$p" 2>/dev/null; then echo busy; else echo stale; fi',
    '  elif [ -n "$(find "$1" -maxdepth 0 -mmin +60)" ]; then echo stale; fi',
    "}"])
_STAGING_STALE_LINE = "\n".join([
    STAGING_KIND,
    f'for o in {STAGING_PREFIX}*; do k=$(staging "$o"); if [ -n "$k" ]; then echo "@@$k $o"; fi; done'])
# The apply command: runs as root with the upload on stdin (see run_apply). It refuses to run beside
# an earlier run's apply that still runs (the facts saw none, but they may be minutes old), checks
# the script (the upload's end: $2 bytes of files come first, the script's sha256 is $3), then
# starts the script with its output in a log, SIGHUP and SIGPIPE ignored (and so for every process
# it starts): a connection dropped from here on stops neither the script nor its rollback (sshd
# signals nothing to a command without a terminal; sudo's own terminal hangs up with SIGHUP), and
# the log is where a reconnect reads the outcome. The script's progress lines come back as they
# happen (its fd 3 is this command's output), the log once the script ended.
APPLY_COMMAND = "\n".join([
    PATH_SETTING, "umask 077", STAGING_KIND,
    f'd={STAGING_PREFIX}$1; mkdir -m 700 -- "$d" || {{ echo "cannot create $d" >&2; exit 1; }}',
    'echo "$$ $b" > "$d/pid"',
    'cat > "$d/in"',
    # the script comes last: an upload cut short has no whole script (each file is checked on its own)
    'tail -c +"$(($2 + 1))" "$d/in" > "$d/apply.sh"',
    'if [ "$(sha256sum < "$d/apply.sh")" != "$3  -" ]; then',
    '  rm -rf -- "$d"; echo "the upload arrived damaged or cut short: run again" >&2; exit 1',
    "fi",
    # read whole first: a command that leaves its input unread looks like a lost connection
    f'for o in {STAGING_PREFIX}*; do if [ "$o" != "$d" ] && [ "$(staging "$o")" = busy ]; then rm -rf -- "$d"; '
    "echo \"an earlier run's apply is still going on ($o): run deploy again once it has ended\" >&2; exit 1; fi; done",
    "trap '' HUP PIPE",
    'sh "$d/apply.sh" "$d" 3>&1 > "$d/log" 2>&1 < /dev/null &',
    'pid=$!; echo "$pid $b" > "$d/pid"',
    'wait "$pid"',
    # the log by the shell's own read: no process to start on a slow host
    'while IFS= read -r l || [ -n "$l" ]; do printf "%s\\n" "$l"; l=; done < "$d/log"',
    # the log stays for a reconnect unless this end can still say it was read to its end
    'if echo @@toa-collected; then rm -rf -- "$d"; else rm -f -- "$d/in" "$d/apply.sh"; fi',
    ""])


MODULE_TEMP_MARK = ".new-"
MODULE_TEMP_PREFIX = f".toa.ko{MODULE_TEMP_MARK}"  # toa.ko's temp names: .toa.ko.new-<random>
FILE_TEMP_MARK = ".toa-new-"  # every other file's: .<name>.toa-new-<random>
TEMP_SUFFIX_CHARS = 8  # hex digits after a temp name's prefix
_SHA256, _SRCVERSION = artifacts.SHA256_RE, artifacts.SRCVERSION_RE
_MODE = re.compile(r"[0-7]{1,4}")


# ---------------------------------------------------------------- the module state of a host


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
    missing_dirs: set[str] = field(default_factory=set)  # directories of files that the host lacks
    unread: set[str] = field(default_factory=set)  # files the facts did not read (not this host's init's)
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


def _temp_prefix(path: str, mark: str = FILE_TEMP_MARK) -> str:
    """What the temp names of PATH start with: .<name><mark> beside it."""
    directory, name = posixpath.split(path)
    return f"{directory}/.{name}{mark}"


# $r: where $f really is, if $f is a symlink (else $f: temp names beside it are found through the same
# directory). Builtins only where nothing is a symlink: the facts read dozens of paths, most of them
# absent, and a process costs tens of milliseconds on a slow host.
_RESOLVE = 'r=$f; if [ -L "$f" ]; then r=$(readlink -f -- "$f" 2>/dev/null) || r=$f; fi'


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
        lines.append(f'[ -f "$m" ] && grep -qs {q("^" + re.escape(entry) + ":")} {modules_dep} && echo @@indexed')
    # temp names beside the path and, for a symlink written where it points, beside its target
    lines.append(
        f'f=$m; {_RESOLVE}; '
        'if [ "$r" != "$f" ]; then echo "@@resolved m $(printf %s "$r" | base64 -w0)"; fi; '
        f'for t in {temp_prefix}* "${{r%/*}}/.${{r##*/}}"{q(MODULE_TEMP_MARK)}*; do '
        'if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done')
    return lines


# The shell functions the file lines call (a dozen short calls parse faster than pages of script on
# a slow host): sl prints the names it is given that exist as @@stale; fl resolves a symlinked file
# ($1 its number, $2 its path) and finds the temp names beside its target; fr reads it; fs says it
# is the same when sha256sum and stat ($sums, read for the directory) show $3 and mode $4, else reads it;
# fk reads a symlink toa owns; na says a directory is missing ($1) and its files absent.
_FILE_FUNCTIONS = "\n".join([
    "nl='\n'",
    'sl() { for t in "$@"; do if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done; }',
    'fl() { f=$2; if [ -L "$f" ]; then r=$(readlink -f -- "$f" 2>/dev/null) || r=$f; '
    'if [ "$r" != "$f" ]; then echo "@@resolved $1 $(printf %s "$r" | base64 -w0)"; '
    f'sl "${{r%/*}}/.${{r##*/}}"{FILE_TEMP_MARK}*; fi; fi; }}',
    # read through a symlink: the file it points to is the one deploy edits
    'fr() { fl "$1" "$2"; if [ -f "$f" ]; then echo "@@file $1 $(stat -L -c %a "$f") $(base64 -w0 < "$f")"; '
    'else echo "@@absent $1"; fi; }',
    'fs() { case "$nl$sums$nl" in *"$nl$3  $2$nl"*"$nl$4 $2$nl"*) fl "$1" "$2"; echo "@@same $1";; *) fr "$1" "$2";; esac; }',
    'fk() { f=$2; if [ -L "$f" ]; then echo "@@symlink $1 $(printf %s "$(readlink "$f")" | base64 -w0)"; '
    'elif [ -f "$f" ]; then echo "@@file $1 $(stat -c %a "$f") $(base64 -w0 < "$f")"; else echo "@@absent $1"; fi; }',
    'na() { echo "@@nodir $1"; for i; do echo "@@absent $i"; done; }',
])


def _file_lines(files: list[AutoloadFile], not_with_systemd: frozenset[str] = frozenset()) -> list[str]:
    """The state lines of FILES (numbered in their order): content, mode, link target, temp names.
    The files of a directory the host lacks are absent at the cost of one test (a fresh host has
    none of toa's source directory); a directory's temp names are found by one glob for all its
    files, and several files toa owns there (the module sources) by one sha256sum and one stat: one
    as rendered is said the same, not sent whole. The files NOT_WITH_SYSTEMD names are not read
    where systemd runs (@@unread): no host running it gets them, and a shared file's reading costs
    two processes."""
    q = shlex.quote
    by_directory: dict[str, list[tuple[int, AutoloadFile]]] = {}
    for index, f in enumerate(files):
        by_directory.setdefault(posixpath.dirname(f.path), []).append((index, f))
    lines = [_FILE_FUNCTIONS]
    for directory, entries in by_directory.items():
        # a directory the host lacks is written whole under a temp name beside it (apply's
        # _write_files_script): one a cut-short run left is found here
        lines += [f"sl {q(_temp_prefix(directory))}*", f"if [ -d {q(directory)} ]; then",
                  f"sl {q(directory + '/.')}*{FILE_TEMP_MARK}*"]
        owned = [(index, f) for index, f in entries if f.kind == "file"]
        if len(owned) > 1:
            names = " ".join(q(f.path) for _index, f in owned)
            some = " || ".join(f"[ -f {q(f.path)} ]" for _index, f in owned)
            lines.append(f"sums=; if {some}; then sums=$(sha256sum -- {names} 2>/dev/null; "
                         f"stat -L -c '%a %n' -- {names} 2>/dev/null); fi")
        for index, f in entries:
            if f.kind == "symlink":
                lines.append(f"fk {index} {q(f.path)}")
            elif len(owned) > 1 and f.kind == "file":
                # as rendered for any host (no release, no options in it)
                lines.append(f"fs {index} {q(f.path)} {hashlib.sha256(f.content.encode()).hexdigest()} {f.mode:o}")
            elif f.path in not_with_systemd:
                lines.append(f'if [ -d /run/systemd/system ]; then echo "@@unread {index}"; else fr {index} {q(f.path)}; fi')
            else:
                lines.append(f"fr {index} {q(f.path)}")
        lines += ["else", f"na {' '.join(str(index) for index, _f in entries)}", "fi"]
    return lines


def loaded_lines(tag: str) -> list[str]:
    """Lines that print a loaded toa's srcversion (after TAG) and its parameters (@@parameter NAME
    VALUE), nothing where none is loaded: by the shell's own read, as a loaded toa has half a dozen
    parameters and a process each would cost a slow host more than the rest of the reading."""
    return [
        f'if [ -d /sys/module/toa ]; then v=; read -r v < /sys/module/toa/srcversion; echo "{tag} $v"; fi 2>/dev/null',
        'for p in /sys/module/toa/parameters/*; do if [ -r "$p" ]; then v=; read -r v < "$p"; '
        'echo "@@parameter ${p##*/} $v"; fi; done 2>/dev/null',
    ]


_LOADED_LINES = loaded_lines("@@loaded")


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


# ---------------------------------------------------------------- everything in one round trip


# A release that stands for the host's own in the paths the facts command reads before it knows which
# target the host is: replaced by the shell's $kr (its `uname -r`, checked) or $o (another kernel's).
RELEASE_SLOT = "0.0.0-toa-release-slot"
STATE_BEGINS = "@@toa-state-begins"
FACTS_END = "@@toa-facts-end"  # the line after the facts: the command then waits for an apply
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


@functools.lru_cache(maxsize=1)
def _not_with_systemd() -> frozenset[str]:
    """The readable files no host running systemd gets from any target (a line in /etc/modules and
    the like): the facts do not read them there. detect calls a host's init systemd by the same
    test the facts make (/run/systemd/system)."""
    with_systemd = {entry.path for entry in render.bpf_files()}
    for target in targets.all_targets().values():
        with_systemd |= {entry.path for entry in render.hook_sources(target)}
        try:
            with_systemd |= {entry.path for entry in render.autoload_files(target, RELEASE_SLOT, init="systemd")}
        except ToaError:
            continue
    return frozenset(entry.path for entry in readable_files() if entry.path not in with_systemd)


def _release_path_text(text: str, variable: str) -> str:
    """TEXT (a script written for RELEASE_SLOT, which it never quotes) with $VARIABLE for the release."""
    return text.replace(RELEASE_SLOT, "${" + variable + "}")


@functools.lru_cache(maxsize=8)  # the same text for every host of a run: built (and hashed) once
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
        # the release the platform's part read (the one argument); a release that is not one (detect
        # refuses it too) reads nothing
        'kr=$1; case "$kr" in ""|*[!A-Za-z0-9._+~-]*|*..*) kr=not-a-release;; esac',
        *_LOADED_LINES, *modules, "echo '@@module -'",
        *_file_lines(list(readable_files()), _not_with_systemd()), _STAGING_STALE_LINE,
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
    become = (f'elif sudo -n true 2>/dev/null; then echo {STATE_BEGINS}; sudo -n sh -c "$s" toa-facts "$k"; '
              'else echo @@toa-nosudo; fi' if sudo else "else echo @@toa-notroot; fi")
    # in sh whatever the login shell is (and dash, where sh is, reads it faster than bash)
    return "sh -c " + q("\n".join([
        # the effective uid as /proc tells this shell's own (id where it cannot)
        'u=; while read -r n r e z; do if [ "$n" = Uid: ]; then u=$e; break; fi; done < /proc/self/status 2>/dev/null',
        '[ -n "$u" ] || u=$(id -u); echo "@@toa-uid $u"',
        detect.REMOTE_FACTS_COMMAND,  # sets $k, the running release
        f"s={q(state)}",
        # as root, in a subshell of this shell (no process to start)
        f'if [ "$u" = 0 ]; then echo {STATE_BEGINS}; (set -- "$k"; eval "$s")',
        become,
        # then, on the same channel, the apply the facts lead to: its arguments on a line of
        # stdin, the upload after it (see Host.apply); end of input instead, when there is none
        f"printf '\\n%s\\n' {FACTS_END}",
        'IFS= read -r l || exit 0',
        'case "$l" in "apply "*) set -- ${l#apply };; *) exit 0;; esac',
        f"a={q(APPLY_COMMAND)}",
        'if [ "$u" = 0 ]; then (eval "$a"); '
        + ('else sudo -n sh -c "$a" toa-apply "$@"; fi' if sudo else "else exit 1; fi"), ""]))


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
    elif tag == "@@same" and len(words) == 1:
        same = entry(words[0])
        state.files[same.path] = Current("file", same.content, same.mode)
    elif tag == "@@nodir" and len(words) == 1:
        state.missing_dirs.add(posixpath.dirname(entry(words[0]).path))
    elif tag == "@@absent" and len(words) == 1:
        state.files[entry(words[0]).path] = None
    elif tag == "@@unread" and len(words) == 1:
        unread = entry(words[0]).path
        state.files.pop(unread, None)
        state.unread.add(unread)
    elif tag == "@@other" and len(words) == 3 and (words[1] == "-" or _SHA256.fullmatch(words[1])):
        if words[2] != "-" and not words[2].startswith("/"):
            raise ToaError("not an absolute path")
        state.others[validate_release(words[0])] = (None if words[1] == "-" else words[1],
                                                    None if words[2] == "-" else words[2])
    else:
        raise ToaError("not a line the state command prints")


# ---------------------------------------------------------------- the eBPF engine of a host


BPF_CONFIG = ("CONFIG_BPF_SYSCALL", "CONFIG_CGROUP_BPF")
BPF_PIN_DIR = "/sys/fs/bpf/toa"
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


# where a toa-bpf.service can be: the administrator's (deploy's) and the packages' unit directories
BPF_UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")


def bpf_state_command(loader: str = render.BPF_LOADER) -> str:
    """Lines for the state command that print the eBPF engine's facts as @@bpf... lines (and the
    loader's temp names as @@stale); see _parse_bpf_line."""
    q = shlex.quote
    config_lines = "s/^((" + "|".join(BPF_CONFIG) + ")=.*)$/@@bpfconfig \\1/p"
    return "\n".join([
        f"l={q(loader)}",
        'if [ -f "$l" ]; then echo "@@bpfloader $(sha256sum < "$l" | cut -d" " -f1)"; '
        '[ -x "$l" ] && "$l" status 2>/dev/null | sed "s/^/@@bpfstatus /"; fi',
        f'for t in {q(_temp_prefix(loader))}*; do if [ -e "$t" ] || [ -L "$t" ]; then echo "@@stale $t"; fi; done',
        f"if [ -d {q(BPF_PIN_DIR)} ]; then echo @@bpfpinned; fi",
        # systemctl only where the unit is installed: starting it costs more than the rest of the facts
        f"for u in {' '.join(q(f'{d}/{render.BPF_UNIT_NAME}') for d in BPF_UNIT_DIRS)}; do "
        f'if [ -e "$u" ]; then systemctl is-active --quiet {q(render.BPF_UNIT_NAME)} && echo @@bpfunit active; break; fi; done',
        # the kernel's config where the distro keeps it; the runtime signs below where it does not
        f"c=/boot/config-${{kr:-$(uname -r)}}; e={q(config_lines)}",
        '{ if [ -r "$c" ]; then sed -n -E "$e" "$c"; elif [ -r /proc/config.gz ]; then '
        'zcat /proc/config.gz | sed -n -E "$e"; fi; } 2>/dev/null',
        "if [ -e /proc/sys/kernel/unprivileged_bpf_disabled ]; then echo @@bpfsyscall; fi",
        'g=; while read -r a z; do [ "$a" = cgroup2 ] || [ "$z" = cgroup2 ] && g=1; done < /proc/filesystems',
        "if [ -n \"$g\" ]; then echo @@bpfcgroup2; fi",
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
