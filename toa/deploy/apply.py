"""The apply: one script per host (apply_script), with toa.ko (and the other kernels' builds) on the
same command's stdin, that
1. checks that the upload arrived whole (the script, its end, by its sha256; each file in it was
   checked against the artifact's sha256 as it was read for sending, and SSH keeps it intact);
2. puts toa.ko in place as every file is (see below), the current toa.ko hard-linked to toa.ko.prev
   just before the rename; depmod -a;
3. loads it (rmmod first when another build or other options are loaded) and verifies: the kernel
   log after a marker written to /dev/kmsg says `TOA: toa loaded`, /sys/module/toa exists, its
   srcversion is the artifact's and its parameters are the wanted ones;
4. writes the autoload files from toa.render, and toa.ko for the other kernels;
and, when a step fails, runs the undo of every step it started, in reverse. The script runs with
SIGHUP and SIGPIPE ignored and its output in a log on the host: a
connection dropped under it stops neither the script nor its rollback, and the one reconnect
reads the outcome from that log. `--dry-run --json` shows the script a run would send.

Every file deploy writes goes in the same way: toa.ko (and the eBPF loader) by _replace_script, the
autoload files, shared files like /etc/modules merged, the module sources and the rollback's
restores by _write_files_script, all of a step's files in one script. A symlinked path is written
where it points (readlink -f on the host); the new content goes to a temp name beside that target
(`.<name>.toa-new-<random>`, toa.ko's `.toa.ko.new-<random>`; a directory the host lacks, as a
whole tree under such a name), which must hold what was sent before anything else happens (its
sha256, or for toa.ko a copy that ended well, the upload having arrived whole); the temp takes the
target's owner and SELinux label (and mode, for a shared file; a file toa owns gets its own mode);
then sync, the rename over the target, sync.
Any failing step (a full disk included) fails the host, and the temp name is removed. A power cut
leaves each file old or new and whole; the only leftovers it can leave are temp names, which depmod
ignores (they do not end in .ko) and the next run deletes beside the running kernel's toa.ko and the
autoload files (not yet beside other kernels' toa.ko), and the apply's directory under /tmp, which
the next run removes once that apply has ended or died. Any failure rolls back: the previous
toa.ko and autoload files are put back, depmod runs
again, and the previously loaded build is loaded again the way the host loads it (modprobe, or
insmod of its file where it lives outside /lib/modules) or none stays loaded if none was.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import secrets
import shlex
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from toa import remote, render
from toa.artifacts import Artifact
from toa.deploy.facts import (
    _SRCVERSION, BPF_PIN_DIR, FILE_TEMP_MARK, MODULE_TEMP_MARK, PATH_SETTING, STAGING_PREFIX,
    TEMP_SUFFIX_CHARS, ModuleState, _temp_prefix, loaded_lines, modules_dep_entry)
from toa.deploy.host import Host, _describe_failure
from toa.deploy.plan import DEFAULT_PARAMETERS, FileChange, OtherKernel, Plan, parameters_differ
from toa.errors import ToaError
from toa.render import AutoloadFile

LOADED_MESSAGE = "TOA: toa loaded"
# modprobe's words when the kernel refuses an unsigned or untrusted module (Secure Boot, module.sig_enforce=1).
KEY_REJECTED = "Key was rejected by service"


# ---------------------------------------------------------------- writing a file: all or nothing


# Files made under `umask 022` are born with this mode: no chmod for them.
_BORN_MODE = 0o644


def _temp_suffix() -> str:
    return secrets.token_hex(TEMP_SUFFIX_CHARS // 2)


_FAIL = 'fail() { printf "%s\\n" "$*" >&2; exit 1; }'
# keep OLD NEW: NEW takes OLD's owner and SELinux label (selinuxenabled asked once per script)
_KEEP = ('sel=; keep() { chown --reference="$1" -- "$2" || fail "cannot give $2 the owner of $1"; '
         'if [ -z "$sel" ]; then sel=no; if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled '
         '&& command -v chcon >/dev/null 2>&1; then sel=yes; fi; fi; '
         'if [ "$sel" = yes ]; then chcon --reference="$1" -- "$2" || fail "cannot give $2 the SELinux label of $1"; fi; }')


def _target_lines(path: str, resolve: bool) -> list[str]:
    """Shell lines setting $p to PATH (its directory made where missing) and $t to the file a write
    replaces: PATH's target when RESOLVE and PATH is a symlink (readlink -f), else PATH itself."""
    return [
        f"p={shlex.quote(path)}",
        # builtins where they do: a fresh host gets a dozen files, and a process is slow on a slow host
        '[ -d "${p%/*}" ] || mkdir -p -- "${p%/*}" || fail "cannot create the directory of $p"',
        ('t=$p; if [ -L "$p" ]; then t=$(readlink -f -- "$p") && [ -n "$t" ] || fail "cannot resolve $p"; fi'
         if resolve else "t=$p"),
    ]


def _take_lines(temp: str, mode: int, keep_mode: bool, *, chmod: bool = True) -> list[str]:
    """Shell lines giving the file in TEMP (a variable: "$tmp") the owner and SELinux label of $t
    where $t exists (see _KEEP), and MODE, or with KEEP_MODE $t's mode where $t exists. Without CHMOD
    the caller sets MODE itself (one chmod for many files); a temp is born with _BORN_MODE (umask 022)."""
    keep = [f'keep "$t" "{temp}"']
    set_mode = [f'chmod {mode:o} -- "{temp}" || fail "cannot set the mode of {temp}"'] \
        if chmod and mode != _BORN_MODE else []
    if keep_mode:
        keep.append(f'chmod --reference="$t" -- "{temp}" || fail "cannot give {temp} the mode of $t"')
        return ['if [ -e "$t" ]; then', *keep, *(["else", *set_mode] if set_mode else []), "fi"]
    return ['if [ -e "$t" ]; then', *keep, "fi", *set_mode]


def _replace_script(path: str, *, create: str, check: str, same: str, mode: int | None, keep_mode: bool = False,
                    resolve: bool = True, mark: str = FILE_TEMP_MARK, before_rename: str = "") -> str:
    """The one way deploy puts a file on a host, all or nothing (see the module docstring).

    In the script, $p is PATH and $t the file replaced: PATH's target when RESOLVE (readlink -f), else
    PATH itself (a symlink toa owns); $tmp is the temp name beside $t. CREATE writes $tmp; CHECK is a
    test that it holds what was sent; SAME a test that $t already does (nothing to do then). $tmp takes
    $t's owner and SELinux label, and MODE, or with KEEP_MODE $t's mode where $t exists; MODE None
    leaves modes alone (symlinks). BEFORE_RENAME runs just before the rename. Any failing step prints
    one line naming it and exits 1; the temp name never outlives the script. The temp is synced before
    the rename (a power cut leaves the old file or the whole new one), the rename after it."""
    q = shlex.quote
    lines = [
        "set -e", PATH_SETTING, "umask 022", _FAIL,
        *_target_lines(path, resolve),
        f'tmp="${{t%/*}}/.${{t##*/}}"{q(mark + _temp_suffix())}',
        # a process only where a temp is left (a failure): on success the rename took it
        'trap \'if [ -e "$tmp" ]; then rm -f -- "$tmp"; fi\' EXIT',
        f"if {same}; then exit 0; fi",
        # the pipeline's status alone says little (a full disk can fail either side): CHECK decides
        f'if ! err=$( {{ {create}; }} 2>&1 ); then fail "cannot write $t: $(printf %s "$err" | tr "\\n" " ")"; fi',
        f'{check} || fail "cannot write $t: the temp file does not hold what was sent (is the disk full?)"',
    ]
    if mode is not None:
        lines += [_KEEP, *_take_lines("$tmp", mode, keep_mode)]
    lines += ["sync", *([before_rename] if before_rename else []),
              'mv -f -T -- "$tmp" "$t" || fail "cannot rename $tmp over $t"', "sync", ""]
    return "\n".join(lines)


def _sha_is(file_var: str, sha: str) -> str:
    """A test that FILE_VAR's sha256 is SHA (sha256sum of stdin ends its line with "  -": no cut to run)."""
    return f'[ "$(sha256sum 2>/dev/null < "{file_var}")" = {shlex.quote(sha + "  -")} ]'


@dataclass(frozen=True)
class FileWrite:
    """PATH made a file holding TEXT with MODE (KEEP_MODE: the existing file's mode), written where
    PATH points if it is a symlink (unless not RESOLVE); or, for KIND symlink, a symlink to TEXT."""

    path: str
    kind: str  # "file" or "symlink"
    text: str
    mode: int = 0o644
    keep_mode: bool = False
    resolve: bool = True


def _new_trees(writes: list[FileWrite], missing_dirs: frozenset[str]) -> dict[str, str]:
    """The topmost of MISSING_DIRS (directories the host lacks) that WRITES put files in, each with the
    temp name of the tree written whole beside it and renamed into place once."""
    roots = {}
    for w in writes:
        directory = posixpath.dirname(w.path)
        if w.kind == "symlink" or directory not in missing_dirs:
            continue
        while posixpath.dirname(directory) in missing_dirs:
            directory = posixpath.dirname(directory)
        roots.setdefault(directory, _temp_prefix(directory) + _temp_suffix())
    return roots


def _write_files_script(writes: list[FileWrite], missing_dirs: frozenset[str] = frozenset()) -> str:
    """Put every one of WRITES in place, each all or nothing (see the module docstring), in one
    script whose cost hardly grows with the files: every temp file is written by the shell itself
    (printf), all of them checked by one sha256 of their concatenation, the modes set by one chmod
    per mode, one sync before the renames and one after. A directory the host lacks
    (MISSING_DIRS, from the facts) is written whole under a temp name and renamed into place once, a
    fresh host's module sources included. A failing step prints one line naming the file and exits
    1; no temp name outlives the script. Files already as wanted are written again: the plan wrote
    only what differs."""
    q = shlex.quote
    trees = _new_trees(writes, missing_dirs)
    lines = [
        "set -e", PATH_SETTING, "umask 022", _FAIL,
        # the shell's own printf writes each file (no process); a failure's reason is the redirection's
        # (a failed write is tried once more through cat, whose error names the cause: dash's says I/O error)
        'put() { printf %s "$2" 2>/dev/null > "$1" && return; e=$( { printf %s "$2" | cat > "$1"; } 2>&1 ) && return; '
        'fail "cannot write $t: ${e##*: }"; }',
        _KEEP,
        # on EXIT, what is left of the temps (a failure's; none after the renames), removed by one rm
        "left() { for x; do if [ -e \"$x\" ] || [ -L \"$x\" ]; then rm -rf -- \"$@\" 2>/dev/null; return; fi; done; }",
        "trap 'left " + " ".join([*(f'"$tmp{i}"' for i in range(len(writes))), *(q(temp) for temp in trees.values())])
        + "' EXIT",
    ]
    for n, (root, temp) in enumerate(trees.items()):
        inside = sorted({posixpath.dirname(w.path) for w in writes if w.path.startswith(root + "/")})
        lines += [f"root{n}={q(root)}; tree{n}={q(temp)}",
                  f'[ ! -e "$root{n}" ] || fail "$root{n} appeared after the facts were read: run again"',
                  f"mkdir -p -- {' '.join(q(temp + d[len(root):]) for d in inside)} || fail \"cannot create $tree{n}\""]
    contents, by_mode, renames = [], {}, []
    for i, w in enumerate(writes):
        root = next((r for r in trees if w.path.startswith(r + "/")), None)
        if root is not None:  # in a new tree: nothing to resolve, keep or rename one by one
            lines += [f"t={q(w.path)}; t{i}=$t; tmp{i}={q(trees[root] + w.path[len(root):])}",
                      f"put \"$tmp{i}\" {q(w.text)}"]
            contents.append(w.text.encode())
            by_mode.setdefault(w.mode, []).append(i)
            continue
        lines += [*_target_lines(w.path, w.resolve and w.kind != "symlink"),
                  f't{i}=$t; tmp{i}="${{t%/*}}/.${{t##*/}}"{q(FILE_TEMP_MARK + _temp_suffix())}']
        renames.append(f'mv -f -T -- "$tmp{i}" "$t{i}" || fail "cannot rename $tmp{i} over $t{i}"')
        if w.kind == "symlink":
            lines += [f'ln -s -- {q(w.text)} "$tmp{i}" || fail "cannot write $t"',
                      f'[ "$(readlink -- "$tmp{i}")" = {q(w.text)} ] || fail "cannot write $t: the link is not what was sent"']
            continue
        if "\0" in w.text:  # a shell word cannot hold NUL
            lines.append(f'printf %s {q(base64.b64encode(w.text.encode()).decode())} | base64 -d > "$tmp{i}" '
                         '|| fail "cannot write $t"')
        else:
            lines.append(f"put \"$tmp{i}\" {q(w.text)}")
        contents.append(w.text.encode())
        lines += _take_lines(f"$tmp{i}", w.mode, w.keep_mode, chmod=w.keep_mode)
        if not w.keep_mode:  # one chmod per mode below
            by_mode.setdefault(w.mode, []).append(i)
    for mode, indexes in by_mode.items():
        if mode == _BORN_MODE:
            continue
        words = " ".join(f'"$tmp{i}"' for i in indexes)
        lines.append(f'chmod {mode:o} -- {words} || fail "cannot set the mode of the new files"')
    if contents:
        # one sha256sum for all the temps (a file cut short, a full disk, changes its line): its
        # output compared whole with the lines the contents sent give (a path with a backslash or
        # a newline, which sha256sum escapes, would fail here, never pass)
        files = [i for i, w in enumerate(writes) if w.kind != "symlink"]
        want = "${nl}".join(f"{hashlib.sha256(text).hexdigest()}  ${{tmp{i}}}" for i, text in zip(files, contents))
        temps = " ".join(f'"$tmp{i}"' for i in files)
        lines += ["nl='\n'", f'want="{want}"',
                  f'[ "$(sha256sum -- {temps})" = "$want" ] '
                  f'|| fail "cannot write $t0{_more(len(writes))}: the temp files do not hold what was sent (is the disk full?)"']
    lines += ["sync", *(f'mv -T -- "$tree{n}" "$root{n}" || fail "cannot rename $tree{n} to $root{n}"'
                        for n in range(len(trees))), *renames, "sync", ""]
    return "\n".join(lines)


def _more(count: int) -> str:
    return f" and {count - 1} more" if count > 1 else ""


def _names(paths: list[str]) -> str:
    return paths[0] + _more(len(paths))


def _write_file_script(path: str, kind: str, text: str, mode: int, *, keep_mode: bool = False,
                       resolve: bool = True) -> str:
    """One file's write (see _write_files_script), nothing done where the file is already so: a
    rollback's restore of a file the run never replaced writes nothing (on a full disk, it could not)."""
    q = shlex.quote
    if kind == "symlink":
        same = f'[ -L "$p" ] && [ "$(readlink -- "$p")" = {q(text)} ]'
    else:
        target = 't=$p; if [ -L "$p" ]; then t=$(readlink -f -- "$p") || t=$p; fi; ' if resolve else "t=$p; "
        same = f'{target}[ -f "$t" ] && {_sha_is("$t", hashlib.sha256(text.encode()).hexdigest())}'
        if not keep_mode:
            same += f' && [ "$(stat -c %a -- "$t")" = {mode:o} ]'
    return (f"{PATH_SETTING}\np={q(path)}\nif {same}; then exit 0; fi\n"
            + _write_files_script([FileWrite(path, kind, text, mode, keep_mode, resolve)]))


def _remove_files_script(removals: list[tuple[str, bool]]) -> str:
    """Remove each (PATH, RESOLVE) of REMOVALS: where PATH points when RESOLVE, as _write_files_script
    wrote it; one rm, one sync."""
    q = shlex.quote
    lines = [PATH_SETTING]
    for i, (path, resolve) in enumerate(removals):
        lines.append(f"r{i}={q(path)}" + (f'; if [ -L "$r{i}" ]; then r{i}=$(readlink -f -- "$r{i}") || r{i}=; fi'
                                          if resolve else ""))
    words = " ".join(f'${{r{i}:+"$r{i}"}}' for i in range(len(removals)))
    return "\n".join([*lines, f"rm -f -- {words}", "sync", ""])


def _remove_file_script(path: str, *, resolve: bool = True) -> str:
    return _remove_files_script([(path, resolve)])


def _change_files_script(changes: list[FileChange], missing_dirs: frozenset[str] = frozenset()) -> str:
    """Every one of CHANGES made: the writes in one go (_write_files_script), then the removals."""
    writes = [FileWrite(change.entry.path, "symlink" if change.entry.kind == "symlink" else "file", change.text,
                        change.entry.mode, **_writes(change.entry)) for change in changes if change.text is not None]
    removals = [(change.entry.path, _writes(change.entry)["resolve"]) for change in changes if change.text is None]
    return "".join([_write_files_script(writes, missing_dirs) if writes else "",
                    _remove_files_script(removals) if removals else ""])


def _writes(entry: AutoloadFile) -> dict:
    """How ENTRY's path is written, whatever is put there: where it points if it is a symlink (but
    a symlink toa owns is replaced itself), keeping the existing file's mode for a shared file (a
    file toa owns gets its own)."""
    return {"keep_mode": entry.kind == "lines", "resolve": entry.kind != "symlink"}


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
    """Load toa (after rmmod when RELOAD) and print what verification needs (see parse_load): the
    shell's own read for /sys, one sed for the kernel log after MARKER."""
    q = shlex.quote
    load = load_invocation(module_file, release, arguments)
    return "\n".join([
        PATH_SETTING,
        f"echo {q(marker)} > /dev/kmsg",
        *(['if [ -d /sys/module/toa ] && ! out=$(rmmod toa 2>&1); then '
           'printf "%s\\n" "$out" | sed "s/^/@@rmmod /"; exit 0; fi'] if reload else []),
        f'out=$({load} 2>&1); echo "@@exit $?"',
        '[ -z "$out" ] || printf "%s\\n" "$out" | sed "s/^/@@modprobe /"',
        *loaded_lines("@@srcversion"),
        f'dmesg | sed -n {q("/" + marker + "/,$s/^/@@log /p")}',
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
        """What the apply command reads on its stdin: the payloads, each checked against its sha256
        as it is read here, then the script."""
        parts = []
        for payload in self.payloads:
            data = payload.local.read_bytes()
            if len(data) != payload.size or hashlib.sha256(data).hexdigest() != payload.sha256:
                raise ToaError(f"{payload.local} changed since it was found (its sha256 is not the artifact's): "
                               "run again")
            parts.append(data)
        return b"".join(parts) + self.text.encode()


NOT_STARTED = "@@toa-not-started"
STEP_TAG = "@@step "  # a progress line: the tag, then the step's name


def _collect_command(token: str) -> str:
    """After a lost connection: wait for the apply's log to end, print it, then remove its directory."""
    return "\n".join([
        f"d={STAGING_PREFIX}{token}; i=0",
        f'[ -d "$d" ] || {{ echo {NOT_STARTED}; exit 0; }}',  # the upload was cut short, or never began
        f'while [ $i -lt {COLLECT_SECONDS} ] && ! grep -qs "^@@end" "$d/log"; do sleep 1; i=$((i + 1)); done',
        'cat -- "$d/log" 2>/dev/null; if grep -qs "^@@end" "$d/log"; then rm -rf -- "$d"; fi; true', ""])


def _load_check_script(artifact: Artifact, parameters: dict[str, str]) -> str:
    """The script's own check of a load (check_load's, in the shell: the rollback is decided there);
    $d/load holds load_command's output. Builtins only: it reads a few dozen lines."""
    q = shlex.quote
    names = list(parameters)
    lines = [
        "ok=; logged=; src=; " + "".join(f"p{i}=; " for i in range(len(names))),
        'while IFS= read -r l; do case "$l" in',
        '  "@@rmmod "*) exit 1;;',
        '  "@@exit 0") ok=1;;',
        f'  "@@log "*{q(LOADED_MESSAGE)}*) logged=1;;',
        '  "@@srcversion "*) src=${l#@@srcversion };;',
        # a parameter the module does not show counts as empty, as in check_load
        *(f'  {q(f"@@parameter {name} ")}*) p{i}=${{l#"@@parameter {name} "}};;' for i, name in enumerate(names)),
        'esac; done < "$d/load"',
        " && ".join(['[ -n "$ok" ]', '[ -n "$logged" ]', f'[ "$src" = {q(artifact.srcversion)} ]',
                     *(f'[ "$p{i}" = {q(parameters[name])} ]' for i, name in enumerate(names))]),
    ]
    return "\n".join(lines)


def _install_script(payload: Payload, path: str, mark: str = MODULE_TEMP_MARK, mode: int = 0o644) -> str:
    """Put the upload's PAYLOAD at PATH, the file it replaces kept as PATH.prev (see _restore_module_script).
    The upload arrived whole (the apply command's check): the temp is its copy when the copy ended
    well (and, cut from the middle of the upload, has the payload's size): no sha256 of a megabyte
    again on a slow host."""
    if payload.offset == 0:
        # one command whose status says it all: the upload holds the payload's bytes whole (the
        # script after them arrived), so head wrote them all into the temp or failed
        extract, check = f'head -c {payload.size} "$d/in"', "true"
    else:  # a pipeline's status is its last command's: the size tells a short read
        extract = f'tail -c +{payload.offset + 1} "$d/in" | head -c {payload.size}'
        check = f'[ "$(wc -c < "$tmp")" -eq {payload.size} ]'
    return _replace_script(
        path, create=f'{extract} > "$tmp"',
        check=check, same=f'[ -f "$t" ] && {_sha_is("$t", payload.sha256)}', mode=mode,
        mark=mark, before_rename='if [ -f "$t" ]; then ln -f -- "$t" "$t.prev" || fail "cannot keep $t as $t.prev"; fi')


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
    ends_synced = False  # whether the last step's script ends with a sync (then the script need not)

    def progress(name: str) -> str:
        """A progress line, sent as it happens on fd 3 (the apply command's output; not in the log)."""
        return f"echo {q(STEP_TAG + name)} 2>/dev/null >&3"

    def flag(key: str) -> str:
        return flags.setdefault(key, f"s{len(flags)}")

    # umask 022: the files and directories the steps make (depmod's indexes, a new directory) are
    # readable by all, as the package manager's are; the staging directory stays root's alone
    lines = [f"# toa {artifact.srcversion} for {artifact.release}: applied by `invoke deploy` as one script",
             PATH_SETTING, "umask 022", 'd=$1; failed=', "trap 'failed=1; echo \"@@failed terminated\"' TERM INT", ""]

    def step(name: str, what: str, script: str, *keys: str, check: str = "") -> None:
        """SCRIPT as a step (KEYS: what it starts, see _done_keys); with CHECK, its output is kept in
        $d/load for CHECK, which decides."""
        nonlocal ends_synced
        lines.extend([f"# {what}", 'if [ -z "$failed" ]; then', progress(name)])
        for key in keys:
            lines.append(f"{flag(key)}=1")
        lines.extend(["(", script.rstrip("\n"), ")"])
        ends_synced = script.rstrip("\n").endswith("\nsync")
        if check:
            lines[-1] += ' > "$d/load" 2>&1'
            lines.extend(['while IFS= read -r l; do printf "%s\\n" "$l"; done < "$d/load"', "(", check, ")"])
        lines.extend([f'[ $? -eq 0 ] || {{ failed=1; echo {q("@@failed " + what)}; }}', "fi", ""])

    if plan.stale:
        step("stale", "removing temp files of an interrupted run",
             f"rm -rf -- {' '.join(q(path) for path in plan.stale)}\nsync")
    if plan.install:
        step("upload", f"installing {posixpath.basename(module_file)}", _install_script(payloads[0], module_file),
             "install")
        lines.extend([f'[ -n "$failed" ] || {progress("installed")}', ""])
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
    if plan.files:
        # one step: a file costs a process or two on the host, not ten
        step("autoload", f"writing {_names([change.entry.path for change in plan.files])}",
             _change_files_script(list(plan.files), frozenset(state.missing_dirs)),
             *(f"file:{change.entry.path}" for change in plan.files))
    if plan.detach_bpf:
        step("daemon-reload", "systemctl daemon-reload", "systemctl daemon-reload")
    for index, other in enumerate(others, start=int(plan.install)):
        depmod = f"depmod -a {q(other.release)}" if modules_dep_entry(other.module_file, other.release) else ""
        step("other kernel", f"installing toa.ko for {other.release}",
             _install_script(payloads[index], other.module_file) + f"\n{depmod}",
             f"other:{other.module_file}")

    lines.extend(["rollback() {", "  r=rolled-back"])
    for what, script, needs in _undo_steps(state, module_file, artifact.release, done):
        started = " || ".join(f'[ -n "${flag(key)}" ]' for key in needs)
        lines.extend([f"  # {what}", f"  if {started}; then", f"    echo {q('@@undo ' + what)}", "    (",
                      script().rstrip("\n"), '    ) > "$d/undo" 2>&1',
                      f'    [ $? -eq 0 ] || {{ r=rollback-incomplete; echo "@@undo-failed {what}: '
                      '$(tail -n 1 "$d/undo" | tr -d "\\n")"; }', "  fi"])
    lines.extend(["  echo \"@@result $r\"", "}", "",
                  'if [ -n "$failed" ]; then rollback; else echo "@@result ok"; fi',
                  # what the steps or the rollback wrote, on disk before the end is told
                  '[ -z "$failed" ] || sync' if ends_synced else "sync", "echo @@end", ""])
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
    arguments = f"{token} {offset} {hashlib.sha256(script.text.encode()).hexdigest()}"

    def on_line(line: str) -> None:
        if line.startswith(STEP_TAG):
            say(line[len(STEP_TAG):])

    try:
        ran = host.apply(arguments, upload, "applying the plan", on_line)
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
        if NOT_STARTED in log.splitlines():
            host.close()
            raise ApplyFailed(f"{lost}; the apply had not started on the host (nothing changed): "
                              "run deploy again") from None
        if "@@end" not in log.splitlines():
            host.close()
            raise ApplyFailed(f"{lost}; no outcome of the apply within {COLLECT_SECONDS} s of reconnecting: "
                              "run deploy again") from None
        return host, log
    if ran.exited != 0 and "@@end" not in ran.stdout.splitlines():
        tail = (ran.stderr or ran.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToaError(f"applying the plan failed on {host.node.name} (exit {ran.exited}): {tail[0]}")
    return host, ran.stdout


# ---------------------------------------------------------------- the rollback: each started step undone, in reverse


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


def _done_keys(done: _Done) -> set[str]:
    """The names of the steps DONE started, as _undo_steps names what each undo needs."""
    keys = {f"file:{change.entry.path}" for change in done.files}
    keys |= {f"other:{other_file}" for other_file, _other, _old in done.others}
    keys |= {key for key, started in (("install", done.installed), ("load", done.load_attempted),
                                      ("loader", done.loader_installed), ("bpf", done.bpf_changed)) if started}
    return keys


def _unit_command(verb: str) -> str:
    return f"systemctl {verb} {shlex.quote(render.BPF_UNIT_NAME)}"


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
    restore = (f'{_sha_is("$m.prev", old)} || '
               '{ echo "toa.ko.prev is not the module this run replaced" >&2; exit 1; }; mv -f -T -- "$m.prev" "$m"'
               if old else 'rm -f -- "$m"')
    depmod = f"depmod -a {q(release)}" if modules_dep_entry(module_file, release) is not None else "true"
    return "\n".join([
        PATH_SETTING, f"m=$(readlink -f -- {q(module_file)}) || m={q(module_file)}",
        f'if ! {_sha_is("$m", old or "")}; then {restore} || exit 1; fi',
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
