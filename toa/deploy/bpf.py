"""The eBPF engine's deploy (--engine bpf, or auto where the host can run it: plan.choose_engine).

It goes the module's way with its own plan (make_bpf_plan): the static loader installed like toa.ko,
toa-bpf.service and its wants link written like the autoload files, the module's autoload files
removed and toa.ko unloaded, then the unit started and `toa-bpf status` checked, step by step from
here (a command each), with the rollback (apply's undo steps) run from here too. Its facts come in
the same facts round trip. One engine at a time: each plan takes the other engine away before its
own starts, and a rollback stops the engine this run started before it brings back the one the host had.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path

from toa import engine_bpf, render
from toa.deploy.apply import (
    _change_files_script, _detach_bpf_script, _Done, _names, _replace_script, _sha_is, _unit_command)
from toa.deploy.builds import _bpf_build_for
from toa.deploy.facts import (
    _SHA256, BPF_PIN_DIR, FILE_TEMP_MARK, PATH_SETTING, STAGING_PREFIX, ModuleState, parse_bpf_state)
from toa.deploy.host import DeployOptions, Host, HostResult
from toa.deploy.plan import make_bpf_plan, same_parameters, wanted_parameters
from toa.errors import ToaError
from toa.render import AutoloadFile

BPF_ATTACH_FAILED = "the eBPF engine did not attach"
BPF_PROGRAMS = 3  # links toa-bpf status lists: the sock_ops program and the two getpeername ones


def _daemon_reload(host: Host) -> None:
    host.run_as_root(f"{PATH_SETTING}\nsystemctl daemon-reload\n", "systemctl daemon-reload")


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


# ---------------------------------------------------------------- one host, step by step


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
            path, create=f'cat -- {q(staged)} > "$tmp"', check=_sha_is("$tmp", sha),
            same=f'[ -f "$t" ] && {_sha_is("$t", sha)}', mode=mode, mark=mark,
            before_rename='if [ -f "$t" ]; then ln -f -- "$t" "$t.prev" || fail "cannot keep $t as $t.prev"; fi'),
            f"installing {name}")
    finally:
        try:
            host.run_as_user(f"rm -rf {q(staging)}", "removing the upload")
        except ToaError:
            pass  # the host is gone; the next boot or run finds a stale upload under /tmp only


def _change_files(host: Host, changes, done: _Done, say) -> None:
    if not changes:
        return
    say("autoload")
    done.files.extend(changes)
    host.run_as_root(_change_files_script(list(changes)), f"writing {_names([c.entry.path for c in changes])}")


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
