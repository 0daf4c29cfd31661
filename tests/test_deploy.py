"""invoke deploy / status: pure tests of the fact parsers and the plan on output recorded from a real
guest, then a real fleet: three QEMU guests booting real Debian kernels (two 6.1, one 5.10) with
systemd and sshd, deployed to over SSH with the real command."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, json_items, toa
from toa import detect, render, targets
from toa.artifacts import Artifact
from toa.artifacts import find as find_artifact
from toa.deploy.apply import (
    NOT_STARTED, _collect_command, _load_check_script, ApplyScript, FileWrite, Payload, _write_file_script,
    _write_files_script, apply_script, check_load, outcome_error, parse_apply, parse_load)
from toa.deploy.facts import (
    _STAGING_STALE_LINE, APPLY_COMMAND, RELEASE_SLOT, STAGING_PREFIX, STATE_BEGINS, TREE_BEGINS, Current, HostRefused, ModuleState,
    facts_command, module_layouts, parse_facts, parse_state, state_command)
from toa.deploy.fleet import deploy, next_boot, run_fleet
from toa.deploy.host import COMMAND_TIMEOUT_SECONDS, DeployOptions, Host, HostResult
from toa.deploy.plan import OtherKernel, Plan, make_plan, other_kernels, parameters_differ, wanted_parameters
from toa.errors import ToaError
from toa.nodes import Node
from toa.remote import HostSpec, SshOptions

RELEASE = "6.1.0-56-amd64"
MODULE_FILE = f"/lib/modules/{RELEASE}/extra/toa.ko"
# The files the recordings below know (made before the kernel-install hook existed): the boot files.
HOOKS = ("/etc/kernel/postinst.d/zz-toa", "/etc/kernel/header_postinst.d/zz-toa")


def _recorded_files(options=None):
    return [f for f in render.autoload_files(targets.get("debian-12"), RELEASE, init="systemd", options=options)
            if f.path not in HOOKS]


FILES = _recorded_files()
SRCVERSION = "0123456789ABCDEF0123456"
SHA256 = "5" * 64


def _artifact(sha256=SHA256, srcversion=SRCVERSION):
    return Artifact(Path("dist/debian-12") / RELEASE / "toa.ko",
                    {"kernel_release": RELEASE, "target": "debian-12", "sha256": sha256, "srcversion": srcversion})


# ---------------------------------------------------------------- pure: recorded output of a real guest

# Recorded on a bookworm guest booting 6.1.0-56-amd64 (toa.guests): state_command before any deploy
# (fresh), after one with two temp names left beside the files (deployed); load_command for a reload
# with kinds=254,200 (reload), and for a reload with kinds=1, which the module refuses (badload).
RECORDED = {
    'fresh': (
        '@@absent 0\n'
        '@@absent 1\n'
    ),
    'deployed': (
        '@@loaded 8A22A252B656421042FCE4E\n'
        '@@parameter kinds 254,253\n'
        '@@installed b591a3e85ba26f518f3606da8711457f2096ff72f4f80199fccacc5a8f0314d4 8A22A252B656421042FCE4E\n'
        '@@indexed\n'
        '@@stale /lib/modules/6.1.0-56-amd64/extra/.toa.ko.new-0123abcd\n'
        '@@stale /etc/modprobe.d/.toa.conf.toa-new-deadbeef\n'
        '@@file 0 644 IyBXcml0dGVuIGJ5IHRvYTogc3lzdGVtZC1tb2R1bGVzLWxvYWQgbG9hZHMgdGhlIHRvYSBtb2R1bGUgKGNsaWVudCBhZGRyZXNzZXMgZnJvbSBUQ1Agb3B0aW9ucykKIyBhdCBib290LCBiZWZvcmUgdGhlIG5ldHdvcmsgYW5kIHNlcnZpY2VzIHN0YXJ0LiBUbyBzdG9wIGxvYWRpbmcgaXQgYXQgYm9vdCwgZGVsZXRlIHRoaXMgZmlsZS4KdG9hCg==\n'
        '@@file 1 644 IyBXcml0dGVuIGJ5IHRvYTogb3B0aW9ucyBvZiB0aGUgdG9hIG1vZHVsZSAoY2xpZW50IGFkZHJlc3NlcyBmcm9tIFRDUCBvcHRpb25zKSwgYXBwbGllZAojIHdoZW5ldmVyIG1vZHByb2JlIGxvYWRzIGl0LiBUbyBnbyBiYWNrIHRvIHRoZSBtb2R1bGUncyBkZWZhdWx0cywgZGVsZXRlIHRoaXMgZmlsZS4KIyBObyBvcHRpb25zOiB0aGUgbW9kdWxlJ3MgZGVmYXVsdHMgYXBwbHkgKGtpbmRzPTI1NCwyNTMpLgo=\n'
    ),
    'reload': (
        '@@exit 0\n'
        '@@modprobe \n'
        '@@srcversion 8A22A252B656421042FCE4E\n'
        '@@parameter kinds 254,200\n'
        '@@log [   32.687768] toa-deploy: load 00112233\n'
        '@@log [   32.827285] TOA: toa unloaded\n'
        '@@log [   33.027650] TOA: toa loaded\n'
    ),
    'badload': (
        '@@exit 1\n'
        "@@modprobe modprobe: ERROR: could not insert 'toa': Invalid argument\n"
        '@@log [   82.021386] toa-deploy: load 44556677\n'
        '@@log [   82.311750] TOA: toa unloaded\n'
        '@@log [   82.407667] TOA: kinds: 1 is not a TCP option kind that carries data (2..255)\n'
    ),
}
RECORDED_SRCVERSION = "8A22A252B656421042FCE4E"
RECORDED_SHA256 = "b591a3e85ba26f518f3606da8711457f2096ff72f4f80199fccacc5a8f0314d4"


def test_state_of_a_fresh_host():
    state = parse_state(RECORDED["fresh"], FILES)
    assert state == ModuleState(files={f.path: None for f in FILES})
    plan = make_plan(state, _artifact(), FILES, MODULE_FILE, None)
    assert (plan.install, plan.depmod, plan.load, plan.stale) == (True, True, "load", ())
    assert [change.entry.path for change in plan.files] == [f.path for f in FILES]
    assert all(change.previous is None for change in plan.files)


def test_state_of_a_deployed_host_with_leftovers():
    state = parse_state(RECORDED["deployed"], FILES)
    assert state.loaded and state.loaded_srcversion == RECORDED_SRCVERSION
    assert state.parameters == {"kinds": "254,253"}
    assert state.installed_srcversion == RECORDED_SRCVERSION and state.indexed
    assert state.stale == [f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd",
                           "/etc/modprobe.d/.toa.conf.toa-new-deadbeef"]
    for entry in FILES:
        assert state.files[entry.path] == Current("file", entry.content, 0o644)
    artifact = _artifact(RECORDED_SHA256, RECORDED_SRCVERSION)
    plan = make_plan(state, artifact, FILES, MODULE_FILE, None)
    assert plan == Plan(stale=tuple(state.stale))  # only the leftovers to clean
    state.stale.clear()
    assert make_plan(state, artifact, FILES, MODULE_FILE, None).empty


def test_plan_reloads_for_another_build_or_other_options():
    state = parse_state(RECORDED["deployed"], FILES)
    state.stale.clear()
    other_build = make_plan(state, _artifact(RECORDED_SHA256, "0" * 23), FILES, MODULE_FILE, None)
    assert (other_build.install, other_build.load, other_build.files) == (False, "reload", ())
    options = {"kinds": "254,200"}
    with_options = make_plan(state, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION),
                             _recorded_files(options),
                             MODULE_FILE, options)
    assert with_options.load == "reload"
    assert [change.entry.path for change in with_options.files] == ["/etc/modprobe.d/toa.conf"]
    new_file = make_plan(state, _artifact(SHA256, RECORDED_SRCVERSION), FILES, MODULE_FILE, None)
    assert (new_file.install, new_file.depmod, new_file.load) == (True, True, "reload")


def test_trusted_ranges_are_compared_as_the_module_shows_them():
    state = parse_state(RECORDED["deployed"], FILES)  # recorded from a module without `trusted`
    wanted = wanted_parameters({"trusted": "fd00:1:0::/64,100.64.0.0/10"})
    assert wanted == {"kinds": "254,253", "trusted": "fd00:1::/64,100.64.0.0/10"}
    assert parameters_differ(state.parameters, wanted) == {"trusted": "fd00:1::/64,100.64.0.0/10"}
    # a module without the parameter trusts every source: the same as an empty list
    assert parameters_differ(state.parameters, wanted_parameters(None)) == {}
    shown = {**state.parameters, "trusted": "fd00:1::/64,100.64.0.0/10"}
    assert parameters_differ(shown, wanted) == {}
    assert parameters_differ(shown, wanted_parameters(None)) == {"trusted": ""}


def test_plan_deletes_only_temp_names_it_makes():
    state = ModuleState(stale=[
        "/etc/passwd", f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd/../../../../etc/shadow",
        f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd x", "/etc/modprobe.d/.toa.conf.toa-new-deadbeef",
    ])
    plan = make_plan(state, _artifact(), FILES, MODULE_FILE, None)
    assert plan.stale == ("/etc/modprobe.d/.toa.conf.toa-new-deadbeef",)


def test_lines_file_merges_into_the_shared_file():
    etc_modules = render.autoload_files(targets.get("debian-12"), RELEASE, init="sysv")
    shared = next(entry for entry in etc_modules if entry.kind == "lines")
    state = ModuleState(files={shared.path: Current("file", "# /etc/modules\nloop\n", 0o644)})
    change = next(c for c in make_plan(state, _artifact(), etc_modules, MODULE_FILE, None).files
                  if c.entry is shared)
    assert change.text.startswith("# /etc/modules\nloop\n") and change.text.endswith(shared.content)
    state.files[shared.path] = Current("file", change.text, 0o644)
    assert shared.path not in [c.entry.path for c in make_plan(state, _artifact(), etc_modules,
                                                                       MODULE_FILE, None).files]


def test_load_output_of_a_reload():
    outcome = parse_load(RECORDED["reload"])
    assert outcome.exit_code == 0 and outcome.srcversion == RECORDED_SRCVERSION
    assert outcome.parameters == {"kinds": "254,200"}
    assert any("TOA: toa unloaded" in line for line in outcome.kernel_log)
    check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,200"})
    with pytest.raises(ToaError, match="srcversion"):
        check_load(outcome, _artifact(RECORDED_SHA256, "0" * 23), {"kinds": "254,200"})
    with pytest.raises(ToaError, match="wanted"):
        check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,253"})


def test_load_output_of_a_failed_modprobe():
    outcome = parse_load(RECORDED["badload"])
    assert outcome.exit_code not in (0, None)
    with pytest.raises(ToaError, match=r"^loading toa failed \(exit 1\): modprobe: ERROR: could not insert 'toa'"):
        check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,253"})


def test_a_kernel_that_wants_signed_modules_says_so():
    # modprobe's and the kernel's words when module.sig_enforce=1 (or Secure Boot) refuses toa.ko
    output = (
        "@@exit 1\n@@modprobe modprobe: ERROR: could not insert 'toa': Key was rejected by service\n"
        "@@log [   30.100000] toa-deploy: load 0011\n@@log [   30.200000] Loading of unsigned module is rejected\n"
    )
    with pytest.raises(ToaError) as error:
        check_load(parse_load(output), _artifact(), {})
    assert "only loads signed modules" in str(error.value) and "sign toa.ko" in str(error.value)


def test_commands_quote_what_they_carry():
    hostile = FILES + [render.AutoloadFile("/etc/it's $(here)", "x", 0o644)]
    command = state_command(MODULE_FILE, RELEASE, hostile)
    assert "fr 2 '/etc/it'\"'\"'s $(here)'" in command
    # the text travels in single quotes to the shell's own printf; the path is quoted once and used as "$p" after
    text = "options toa kinds=254 `reboot` $(reboot) 'x'\n"
    write = _write_file_script("/etc/it's $(here)", "file", text, 0o644)
    assert f'put "$tmp0" {shlex.quote(text)}' in write and write.count("reboot") == 2
    assert write.count("$(here)") == write.count("p='/etc/it'\"'\"'s $(here)'") == 2  # the check, the write
    link = _write_file_script("/etc/it's $(here)", "symlink", "../$(reboot)", 0o777)
    assert "ln -s -- '../$(reboot)' \"$tmp0\"" in link


@pytest.mark.parametrize("line", [
    "@@file 0 not-a-mode aGk=",  # a stat that printed something else
    "@@file 7 644 aGk=",  # no such autoload file
    "@@file x 644 aGk=",
    "@@file 0 644 !!!",  # not base64
    "@@installed garbage 8A22A252B656421042FCE4E",  # a sha256sum that printed nothing or something else
    "@@loaded not a srcversion",
    "@@resolved 0 Li4vZXRj",  # ../etc: not an absolute path
    "@@something 1",
])
def test_state_output_that_the_command_does_not_print_is_an_error(line):
    with pytest.raises(ToaError, match="unexpected line"):
        parse_state(RECORDED["deployed"] + line + "\n", FILES)


@pytest.mark.parametrize("line", ["@@exit abc", "@@srcversion not-one", "@@unloaded 1"])
def test_load_output_that_the_command_does_not_print_is_an_error(line):
    with pytest.raises(ToaError, match="unexpected line"):
        parse_load(RECORDED["reload"] + line + "\n")


def test_untagged_lines_are_not_the_state():
    assert parse_state("Welcome to the host!\n" + RECORDED["fresh"], FILES) == parse_state(
        RECORDED["fresh"], FILES)


def test_temp_names_beside_a_symlinks_target_are_cleaned():
    import base64

    etc_modules = render.autoload_files(targets.get("debian-12"), RELEASE, init="sysv")
    real = "/etc/real/modules.real"
    output = (f"@@resolved 0 {base64.b64encode(real.encode()).decode()}\n"
              "@@stale /etc/real/.modules.real.toa-new-0123abcd\n@@stale /etc/real/.passwd.toa-new-0123abcd\n"
              "@@stale /etc/.modules.toa-new-89abcdef\n@@absent 0\n@@absent 1\n")
    state = parse_state(output, etc_modules)
    assert state.resolved == {"/etc/modules": real}
    assert make_plan(state, _artifact(), etc_modules, MODULE_FILE, None).stale == (
        "/etc/real/.modules.real.toa-new-0123abcd", "/etc/.modules.toa-new-89abcdef")


def _sh(script, *prefix):
    return subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_a_write_goes_where_a_symlink_points_and_keeps_the_files_mode_and_owner(tmp_path):
    """The write script on this machine's filesystem: through a symlink, a shared file's mode, owner
    and group kept; a file toa owns gets its own mode; a second write of the same text changes nothing."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "modules.real").write_text("loop\n")
    (etc / "modules.real").chmod(0o640)
    group = 4242 if os.geteuid() == 0 else os.getgid()  # as root, a group the file would not get by itself
    os.chown(etc / "modules.real", -1, group)
    (etc / "modules").symlink_to("modules.real")
    script = _write_file_script(str(etc / "modules"), "file", "loop\ntoa\n", 0o644, keep_mode=True)
    assert _sh(script).returncode == 0
    assert (etc / "modules").is_symlink() and os.readlink(etc / "modules") == "modules.real"
    real = (etc / "modules.real").stat()
    assert ((etc / "modules.real").read_text(), real.st_mode & 0o7777, real.st_gid) == ("loop\ntoa\n", 0o640, group)
    assert sorted(path.name for path in etc.iterdir()) == ["modules", "modules.real"]

    owned = etc / "modprobe.d" / "toa.conf"
    script = _write_file_script(str(owned), "file", "options toa kinds=254\n", 0o600)
    assert _sh(script).returncode == 0 and owned.stat().st_mode & 0o777 == 0o600
    before = owned.stat().st_ino
    assert _sh(script).returncode == 0 and owned.stat().st_ino == before  # already so: not rewritten


def test_a_directory_the_host_lacks_is_written_whole_and_renamed_into_place_once(tmp_path):
    """The files script on this machine's filesystem: a new source tree (with a subdirectory) goes
    in by one rename beside a file written on its own; a tree that appeared since the facts were
    read is refused with nothing left behind."""
    tree, etc = tmp_path / "usr" / "src" / "toa-kmod-1", tmp_path / "etc"
    etc.mkdir()
    writes = [FileWrite(str(tree / "Kbuild"), "file", "obj-m += toa.o\n"),
              FileWrite(str(tree / "probes" / "a.c"), "file", "int a = '$(reboot)';\n"),
              FileWrite(str(etc / "zz-toa"), "file", "#!/bin/sh\n", 0o755)]
    script = _write_files_script(writes, frozenset({str(tree), str(tree / "probes")}))
    assert script.count("mv ") == 2  # the tree once, the file beside it once
    result = _sh(script)
    assert result.returncode == 0, result.stderr
    assert (tree / "probes" / "a.c").read_text() == "int a = '$(reboot)';\n"
    assert [(path.name, path.stat().st_mode & 0o777) for path in (tree / "Kbuild", tree / "probes", etc / "zz-toa")] == [
        ("Kbuild", 0o644), ("probes", 0o755), ("zz-toa", 0o755)]
    assert sorted(path.name for path in tree.parent.iterdir()) == ["toa-kmod-1"]
    assert sorted(path.name for path in etc.iterdir()) == ["zz-toa"]
    again = _sh(_write_files_script(writes, frozenset({str(tree), str(tree / "probes")})))
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        f"{tree} appeared after the facts were read: run again"]
    assert sorted(path.name for path in tree.parent.iterdir()) == ["toa-kmod-1"]


def test_a_temp_file_that_does_not_hold_what_was_sent_fails_the_write_and_nothing_is_left(tmp_path):
    """The files script's one sha256sum over its temps: a temp that lost a byte (as on a full disk;
    here one is cut short between the writes and the check) fails the step by name, no rename
    happens, and neither temp file nor temp tree outlives the script."""
    tree, etc = tmp_path / "usr" / "src" / "toa-kmod-1", tmp_path / "etc"
    etc.mkdir()
    (etc / "toa.conf").write_text("old\n")
    writes = [FileWrite(str(tree / "Kbuild"), "file", "obj-m += toa.o\n"),
              FileWrite(str(etc / "toa.conf"), "file", "toa\n")]
    script = _write_files_script(writes, frozenset({str(tree)}))
    check = script.index('[ "$(sha256sum')
    for cut in ('truncate -s 1 -- "$tmp1"\n', 'truncate -s 1 -- "$tmp0"\n'):
        result = _sh(script[:check] + cut + script[check:])
        assert result.returncode == 1
        assert result.stderr.strip() == (f"cannot write {tree / 'Kbuild'} and 1 more: the temp files do not hold "
                                          "what was sent (is the disk full?)")
        assert sorted(path.name for path in tmp_path.rglob("*")) == ["etc", "src", "toa.conf", "usr"]
        assert (etc / "toa.conf").read_text() == "old\n"
    assert _sh(script).returncode == 0 and (etc / "toa.conf").read_text() == "toa\n"


def test_the_state_command_reads_files_links_temp_names_and_missing_directories_here(tmp_path):
    """state_command run by sh on files made here: a shared file through a symlink (its target and the
    temp names beside both), a file with a temp name beside it, a directory that is not there."""
    etc = tmp_path / "etc"
    (etc / "real").mkdir(parents=True)
    (etc / "mod").mkdir()
    (etc / "real" / "modules.real").write_text("loop\n")
    (etc / "modules").symlink_to("real/modules.real")
    (etc / "mod" / "toa.conf").write_text("options toa kinds=254\n")
    left = [etc / "real" / ".modules.real.toa-new-0123abcd", etc / ".modules.toa-new-89abcdef",
            etc / "mod" / ".toa.conf.toa-new-aaaabbbb"]
    for path in left:
        path.touch()
    files = [render.AutoloadFile(str(etc / "modules"), "toa\n", 0o644, "lines"),
             render.AutoloadFile(str(etc / "mod" / "toa.conf"), "x", 0o644),
             render.AutoloadFile(str(etc / "new" / "toa.conf"), "x", 0o644)]
    ran = _sh(state_command(str(tmp_path / "toa.ko"), RELEASE, files))
    state = parse_state(ran.stdout, files)
    assert sorted(state.stale) == sorted(map(str, left))
    assert state.resolved == {str(etc / "modules"): str(etc / "real" / "modules.real")}
    assert state.missing_dirs == {str(etc / "new")}
    assert state.files == {str(etc / "modules"): Current("file", "loop\n", 0o644),
                           str(etc / "mod" / "toa.conf"): Current("file", "options toa kinds=254\n", 0o644),
                           str(etc / "new" / "toa.conf"): None}


def test_files_of_a_directory_as_rendered_are_said_the_same_without_their_text(tmp_path):
    """Several files toa owns in one directory (the module sources) are read by one sha256sum and one
    stat: a file as rendered is said the same; another text or mode is read whole, as any file."""
    src = tmp_path / "src"
    src.mkdir()
    wanted = {"Kbuild": "obj-m += toa.o\n", "toa.c": "int toa;\n", "probe.c": "int probe;\n", "gone.c": "x\n"}
    files = [render.AutoloadFile(str(src / name), text, 0o644) for name, text in wanted.items()]
    (src / "Kbuild").write_text(wanted["Kbuild"])
    (src / "toa.c").write_text("int toa; /* edited */\n")
    (src / "probe.c").write_text(wanted["probe.c"])
    (src / "probe.c").chmod(0o600)
    command = state_command(str(tmp_path / "toa.ko"), RELEASE, files)
    ran = _sh(command)
    assert ran.stdout.count("@@same") == 1 and "b2JqLW0" not in ran.stdout  # Kbuild's text not sent
    assert parse_state(ran.stdout, files).files == {
        str(src / "Kbuild"): Current("file", wanted["Kbuild"], 0o644),
        str(src / "toa.c"): Current("file", "int toa; /* edited */\n", 0o644),
        str(src / "probe.c"): Current("file", wanted["probe.c"], 0o600),
        str(src / "gone.c"): None}


def test_a_missing_directory_and_a_tree_left_by_a_cut_run_are_in_the_facts():
    directory = posixpath.dirname(FILES[0].path)
    left = f"{posixpath.dirname(directory)}/.{posixpath.basename(directory)}.toa-new-0123abcd"
    output = RECORDED["fresh"] + f"@@nodir 0\n@@stale {left}\n"
    state = parse_state(output, FILES)
    assert state.missing_dirs == {directory}
    assert left in make_plan(state, _artifact(), FILES, MODULE_FILE, None).stale
    assert "@@nodir" not in RECORDED["fresh"]


def test_a_host_running_systemd_is_not_asked_for_etc_modules_and_a_plan_never_takes_it_for_absent():
    """The facts command run by sh here, once as this machine is (no systemd: /etc/modules read) and
    once with /run/systemd/system made in a mount namespace (not read: @@unread, which no plan
    mistakes for an absent file)."""
    if _sh("true", "unshare", "-m", "--map-root-user").returncode != 0:
        pytest.skip("no mount namespace here (unshare -m refused)")
    if os.path.isdir("/run/systemd/system") or not os.path.isfile("/etc/modules"):
        pytest.skip("needs a machine without systemd running that has /etc/modules")
    command = facts_command(False)
    plain = _sh(command)
    systemd = _sh(f"mount -t tmpfs toa-test-run /run && mkdir -p /run/systemd/system && {command}",
                  "unshare", "-m", "--map-root-user")
    debian = targets.get("debian-12")
    sysv = render.autoload_files(debian, RELEASE, init="sysv")
    etc_modules = next(entry for entry in sysv if entry.path == "/etc/modules")
    def facts(output: str) -> str:  # what the facts command printed before the line that ends them
        before, end, _ = output.partition("\n@@toa-facts-end\n")
        assert end, output
        return before

    read = parse_facts(facts(plain.stdout), "root").state
    assert read.files["/etc/modules"] == Current("file", Path("/etc/modules").read_text(), 0o644)
    unread = parse_facts(facts(systemd.stdout), "root").state
    assert "/etc/modules" not in unread.files and unread.unread == {"/etc/modules"}
    assert unread.files.keys() == read.files.keys() - {"/etc/modules"}
    with pytest.raises(ToaError, match="the facts did not read /etc/modules"):
        make_plan(unread, _artifact(), [etc_modules], MODULE_FILE, None)


def test_a_write_on_a_full_filesystem_fails_in_one_line_and_leaves_the_file_whole(tmp_path):
    """The write script on a tmpfs that is full (mounted in a mount namespace of its own): exit 1, one
    line naming the file and the cause, the file as it was, no temp name left."""
    if _sh("true", "unshare", "-m", "--map-root-user").returncode != 0:
        pytest.skip("no mount namespace here (unshare -m refused)")
    directory = tmp_path / "full"
    directory.mkdir()
    target = directory / "toa.conf"
    script = _write_file_script(str(target), "file", "toa\n" * 100, 0o644)
    check = f"cd {shlex.quote(str(directory))} && sha256sum toa.conf && ls -a"
    result = _sh(f"mount -t tmpfs -o size=8k toa-test-full {shlex.quote(str(directory))} && "
                 f"printf 'old\\n' > {shlex.quote(str(target))} && "
                 f"{{ dd if=/dev/zero of={shlex.quote(str(directory / 'filler'))} bs=1k 2>/dev/null; true; }} && "
                 f"{check} && echo @@write && sh -c {shlex.quote(script)}; echo \"@@exit $?\"; {check}",
                 "unshare", "-m", "--map-root-user")
    before, _, after = result.stdout.partition("@@write\n")
    assert after.endswith("@@exit 1\n" + before), result.stdout
    assert result.stderr.strip().splitlines() == [f"cannot write {target}: No space left on device"]
    assert hashlib.sha256(b"old\n").hexdigest() in before


def test_artifacts_are_found_by_exact_release(tmp_path):
    def put(target, release, data=b"module", **manifest):
        directory = tmp_path / target / release
        directory.mkdir(parents=True)
        (directory / "toa.ko").write_bytes(data)
        fields = {"kernel_release": release, "target": target, "sha256": hashlib.sha256(data).hexdigest(),
                  "srcversion": SRCVERSION, **manifest}
        (directory / "manifest.json").write_text(json.dumps(fields))

    put("debian-12", RELEASE)
    put("ubuntu-22.04", RELEASE, b"other")
    assert find_artifact(tmp_path, RELEASE, "ubuntu-22.04").ko == tmp_path / "ubuntu-22.04" / RELEASE / "toa.ko"
    assert find_artifact(tmp_path, RELEASE, "debian-12").target == "debian-12"
    assert find_artifact(tmp_path, "6.1.0-55-amd64") is None
    put("debian-11", "5.10.0-40-amd64", sha256="0" * 64)
    with pytest.raises(ToaError, match="does not match the sha256"):
        find_artifact(tmp_path, "5.10.0-40-amd64")
    with pytest.raises(ToaError, match="invalid kernel release"):
        find_artifact(tmp_path, "*")


def _node(name):
    return Node(HostSpec(name))


def test_batches_stop_after_max_fail():
    seen, lock = [], threading.Lock()

    def work(node):
        with lock:
            seen.append(node.spec.host)
        return HostResult(node.name, action="failed" if node.spec.host.startswith("bad") else "installed")

    nodes = [_node(n) for n in ("bad1", "ok1", "bad2", "ok2", "ok3", "ok4")]
    results = run_fleet(nodes, work, parallel=2, batch=2, max_fail=1)
    assert [r.action for r in results] == ["failed", "installed", "failed", "installed", "skipped", "skipped"]
    assert sorted(seen) == ["bad1", "bad2", "ok1", "ok2"]
    assert "more than --max-fail 1" in results[-1].detail
    assert [r.action for r in run_fleet(nodes, work, parallel=3)] == [
        "failed", "installed", "failed", "installed", "installed", "installed"]


# ---------------------------------------------------------------- CLI checks that need no host


def test_hostile_nodes_lines_are_rejected_before_any_connection(tmp_path):
    nodes = tmp_path / "nodes.txt"
    # the first line is a host that cannot be reached: were it contacted first, the error would say so
    for hostile in ("root@host;reboot", "$(reboot)", "`reboot`", "host:0", "host:70000", "a@@b", "host sudo=maybe"):
        nodes.write_text(f"root@127.0.0.1:1\n{hostile}\n")
        result = toa("deploy", "--hosts", str(nodes))
        assert_one_line_error(result, f"{nodes}:2:")
        assert result.returncode == 2 and result.stdout == ""


def test_bad_flags_are_one_line_errors(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("root@127.0.0.1:1\n")
    assert_one_line_error(toa("deploy", "--hosts", str(nodes), "--option", "kinds=1"), "invalid kinds")
    assert_one_line_error(toa("deploy", "--hosts", str(nodes), "--option", "debug=1"), "unknown module option")
    assert_one_line_error(toa("deploy", "--hosts", str(nodes), "--parallel", "0"), "--parallel")
    assert_one_line_error(toa("status", "--hosts", str(tmp_path / "absent")), "not found: fix --hosts")


def test_the_command_timeout_is_a_flag_of_deploy_and_status(tmp_path):
    from toa.commands import deploy as commands

    # the tasks' defaults are deploy's own, written out where the CLI starts without paramiko
    assert (commands.COMMAND_TIMEOUT, commands.CONNECT_TIMEOUT) == (COMMAND_TIMEOUT_SECONDS, SshOptions().timeout)
    assert DeployOptions().command_timeout == COMMAND_TIMEOUT_SECONDS
    assert commands._fleet_options("dist", None, None, False, None, "7").command_timeout == 7
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("root@127.0.0.1:1\n")
    for task in ("deploy", "status"):
        assert "--command-timeout" in toa(task, "--help").stdout
        assert_one_line_error(toa(task, "--hosts", str(nodes), "--command-timeout", "0"),
                              "--command-timeout must be a whole number of at least 1")


@pytest.mark.parametrize("task", ["deploy", "status"])
def test_help_is_help_not_a_nodes_file(task):
    result = toa(task, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: toa [--core-opts] {task} [--options]") and "--hosts" in result.stdout
    assert_one_line_error(toa(task), "give --hosts FILE")


def test_invokes_own_dry_flag_is_a_dry_run_or_refused(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("root@127.0.0.1:1\n")  # nothing listens there: the host fails, nothing is changed anywhere
    result = toa("deploy", "--dry", "--hosts", str(nodes), "--known-hosts", str(tmp_path / "kh"), "--json")
    assert json.loads(result.stdout)["dry_run"] is True and json_items(result, "deploy")[0]["action"] == "failed"
    assert_one_line_error(toa("images", "--dry"), "--dry is invoke's echo-only mode and `images` has no dry run")


# ---------------------------------------------------------------- a real fleet

@pytest.fixture(scope="module")
def releases(guest_kernels):
    """(new, old): the newest kernels of bookworm and bullseye, as the mirror has them today."""
    return tuple(tree.release for tree in guest_kernels)


@pytest.fixture(scope="module")
def artifacts(releases, tmp_path_factory):
    """toa.ko built for both kernels (a full dist) and a dist with the new kernel's build only."""
    from toa import build

    new, _old = releases
    dist = tmp_path_factory.mktemp("dist")
    for release in releases:
        build.build_kernel(kernel=release, out_dir=dist)
    partial = tmp_path_factory.mktemp("dist-new-only")
    found = find_artifact(dist, new)
    shutil.copytree(found.ko.parent, partial / found.ko.parent.parent.name / new)
    return dist, partial


@pytest.fixture(scope="module")
def failing_dist(guest_kernels, tmp_path_factory):
    """A dist with a real build for the new kernel whose init fails: it uploads and installs, and the
    kernel refuses to load it (a refusal no preflight can see)."""
    from toa import build

    tree = guest_kernels[0]
    work = tmp_path_factory.mktemp("failing")
    source = work / "module"
    shutil.copytree(build.MODULE_SOURCE, source, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd", "probes.h"))
    toa_c = (source / "toa.c").read_text()
    assert "static int __init toa_init(void)\n{\n" in toa_c
    (source / "toa.c").write_text(toa_c.replace("static int __init toa_init(void)\n{\n",
                                                "static int __init toa_init(void)\n{\n\tif (1)\n\t\treturn -ENODEV;\n"))
    build.build_module(tree.headers_dir, tree.release, tree.suite, work / "dist", module_source=source)
    return work / "dist"


@pytest.fixture(scope="module")
def fleet(guest_kernels, tmp_path_factory):
    """Three guests: guest1 and guest3 boot the new kernel (bookworm's), guest2 the old (bullseye's)."""
    from toa import guests

    with guests.fleet(guest_kernels, tmp_path_factory.mktemp("fleet"), count=3) as running:
        yield running


def _nodes_file(path, fleet, *lines):
    path.write_text("# the test fleet\n" + "".join(line + "\n" for line in lines or [g.node_line() for g in fleet]))
    return path


def _known_hosts(path, fleet):
    path.write_text("".join(g.known_hosts.read_text() for g in fleet))
    return path


def _fleet_args(tmp_path, fleet, *lines):
    return ["--hosts", str(_nodes_file(tmp_path / "nodes.txt", fleet, *lines)), "--key", str(fleet[0].key_path),
            "--known-hosts", str(_known_hosts(tmp_path / "known_hosts", fleet))]


def _deploy_json(*args):
    result = toa("deploy", *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result, {host["host"]: host for host in json_items(result, "deploy")}


def _guest_facts(guest):
    """What a guest has: loaded srcversion, module file hash, temp names, the files deploy writes
    (in _rendered's order)."""
    paths = [f.path for f in render.autoload_files(targets.get("debian-12"), guest.release, init="systemd")]
    directories = " ".join(sorted({os.path.dirname(path) for path in paths}))
    out = guest.run(
        "cat /sys/module/toa/srcversion 2>/dev/null || echo none; "
        "sha256sum /lib/modules/$(uname -r)/extra/toa.ko 2>/dev/null | cut -d' ' -f1 | grep . || echo none; "
        f"find /lib/modules/$(uname -r)/extra {directories} -name '.*toa*' | wc -l; "
        f"for f in {' '.join(paths)}; do "
        "if [ -f $f ]; then base64 -w0 < $f; echo; else echo none; fi; done"
    ).split("\n")
    return {"srcversion": out[0], "sha256": out[1], "temp_names": int(out[2]), "autoload": out[3:3 + len(paths)]}


def _rendered(release, options=None):
    import base64

    files = render.autoload_files(targets.get("debian-12"), release, init="systemd", options=options)
    return [base64.b64encode(f.content.encode()).decode() for f in files]


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_host_without_an_artifact_fails_alone(fleet, releases, artifacts, tmp_path):
    new, old = releases
    full, only_new = artifacts
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(only_new))
    assert result.returncode == 1
    guest1, guest2, guest3 = (hosts[g.node_line()] for g in fleet)
    assert guest2["action"] == "failed"
    assert f"invoke build --kernel {old}" in guest2["detail"], guest2
    artifact = find_artifact(only_new, new)
    for guest, row in ((fleet[0], guest1), (fleet[2], guest3)):
        assert row["action"] == "installed", row
        facts = _guest_facts(guest)
        assert facts == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                         "autoload": _rendered(new)}
    assert _guest_facts(fleet[1])["srcversion"] == "none"


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_dry_run_prints_the_plan_and_changes_nothing(fleet, artifacts, tmp_path):
    full, _ = artifacts
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [hosts[g.node_line()]["action"] for g in fleet] == ["unchanged", "would-install", "unchanged"]
    assert "load toa" in hosts[fleet[1].node_line()]["changes"]
    # the script a run would send, and none where there is nothing to do
    script = hosts[fleet[1].node_line()]["script"]
    assert "modprobe toa" in script and "@@step upload" in script and "rollback() {" in script
    assert hosts[fleet[0].node_line()]["script"] is None
    assert _guest_facts(fleet[1]) == {"srcversion": "none", "sha256": "none", "temp_names": 0,
                                      "autoload": ["none"] * len(_rendered(fleet[1].release))}


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_guest_killed_mid_deploy_fails_alone_and_nothing_half_installed_remains(fleet, releases, artifacts, tmp_path):
    new, old = releases
    full, _ = artifacts
    victim = fleet[1]

    def pull_the_plug(host, step):
        if host == victim.node_line() and step == "installed":  # toa.ko renamed into place, not loaded
            victim.kill()

    nodes = [Node(HostSpec("127.0.0.1", "root", g.port)) for g in fleet]
    options = DeployOptions(dist=full, ssh=SshOptions(
        key_filename=str(victim.key_path), known_hosts=str(_known_hosts(tmp_path / "known_hosts", fleet))))
    results = deploy(nodes, options, progress=pull_the_plug)
    assert [r.action for r in results] == ["unchanged", "failed", "unchanged"], results
    assert not victim.is_running()

    victim.start()
    victim.wait_for_ssh()
    artifact = find_artifact(full, old)
    facts = _guest_facts(victim)
    assert facts["temp_names"] == 0
    assert facts["sha256"] in ("none", artifact.sha256)  # absent, or the whole new file
    assert all(text in ("none", wanted) for text, wanted in zip(facts["autoload"], _rendered(old)))

    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full))
    assert result.returncode == 0, result.stdout + result.stderr
    assert hosts[victim.node_line()]["action"] in ("installed", "updated")
    assert _guest_facts(victim) == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                                    "autoload": _rendered(old)}


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_second_run_changes_nothing_and_status_shows_it(fleet, artifacts, tmp_path):
    full, _ = artifacts
    args = _fleet_args(tmp_path, fleet)
    result = toa("deploy", *args, "--dist", str(full))
    assert result.returncode == 0, result.stderr
    assert "nothing changed" in result.stdout
    result, hosts = _deploy_json(*args, "--dist", str(full))
    assert {row["action"] for row in hosts.values()} == {"unchanged"}
    assert all(row["changes"] == [] for row in hosts.values())

    status = toa("status", *args, "--dist", str(full), "--json")
    assert status.returncode == 0, status.stderr
    rows = {row["host"]: row for row in json_items(status, "status")}
    for guest in fleet:
        artifact = find_artifact(full, guest.release)
        row = rows[guest.node_line()]
        assert (row["kernel"], row["loaded"], row["loaded_srcversion"], row["installed_srcversion"],
                row["artifact"], row["autoload"], row["error"]) == (
            guest.release, True, artifact.srcversion, artifact.srcversion, "match", "complete", None)


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_failed_load_rolls_back_to_the_previous_module(fleet, guest_kernels, artifacts, failing_dist, tmp_path):
    full, _ = artifacts
    guest, tree = fleet[0], guest_kernels[0]
    new = tree.release
    good = find_artifact(full, new)
    before = _guest_facts(guest)
    assert before == {"srcversion": good.srcversion, "sha256": good.sha256, "temp_names": 0,
                      "autoload": _rendered(new)}
    # the old kernel's build under the new kernel's name: the preflight refuses it before any upload
    wrong = find_artifact(full, guest_kernels[1].release)
    bad_dir = tmp_path / "bad-dist" / "debian-12" / new
    bad_dir.mkdir(parents=True)
    shutil.copyfile(wrong.ko, bad_dir / "toa.ko")
    (bad_dir / "manifest.json").write_text(json.dumps({
        "kernel_release": new, "target": "debian-12", "sha256": wrong.sha256, "srcversion": wrong.srcversion}))
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist", str(tmp_path / "bad-dist"))
    row = hosts[guest.node_line()]
    assert result.returncode == 1 and row["action"] == "failed", row
    assert row["detail"].startswith("preflight vermagic check refused") and "nothing was uploaded" in row["detail"], row
    assert _guest_facts(guest) == before

    # a real build for the new kernel whose init fails (a refusal no preflight can see): it uploads,
    # installs and fails to load, and the host is rolled back to the build it had
    assert find_artifact(failing_dist, new).srcversion != good.srcversion
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist", str(failing_dist))
    assert result.returncode == 1
    row = hosts[guest.node_line()]
    assert row["action"] == "failed" and "loading toa failed" in row["detail"] and "rolled back" in row["detail"], row
    assert _guest_facts(guest) == before
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,253"


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_options_through_sudo_and_a_real_reboot_brings_toa_back(fleet, releases, artifacts, tmp_path):
    from toa.guests import SUDO_USER

    new, _old = releases
    full, _ = artifacts
    guest = fleet[2]
    refused, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, f"{guest.node_line(SUDO_USER)} sudo=no"),
                                  "--dist", str(full))
    assert refused.returncode == 1 and "not root and sudo=no" in hosts[guest.node_line(SUDO_USER)]["detail"]

    args = _fleet_args(tmp_path, fleet, f"{guest.node_line(SUDO_USER)} sudo=yes")
    result, hosts = _deploy_json(*args, "--dist", str(full), "--option", "kinds=254,200")
    row = hosts[guest.node_line(SUDO_USER)]
    assert result.returncode == 0 and row["action"] == "updated", row
    assert row["changes"] == ["reload toa", "write /etc/modprobe.d/toa.conf"]
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"

    guest.reboot()
    artifact = find_artifact(full, new)
    assert _guest_facts(guest) == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                                   "autoload": _rendered(new, {"kinds": "254,200"})}
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,200"
    # loaded once in this boot, by systemd-modules-load from the rendered file, before sshd started
    assert guest.run("dmesg").count("TOA: toa loaded") == 1
    shown = guest.run("systemctl show -p ExecMainStatus -p ExecMainExitTimestampMonotonic systemd-modules-load; "
                      "systemctl show -p ExecMainStartTimestampMonotonic ssh")
    values = dict(line.split("=", 1) for line in shown.split())
    assert values["ExecMainStatus"] == "0", shown
    assert 0 < int(values["ExecMainExitTimestampMonotonic"]) < int(values["ExecMainStartTimestampMonotonic"]), shown

    result, hosts = _deploy_json(*args, "--dist", str(full))  # back to the module's defaults
    assert hosts[guest.node_line(SUDO_USER)]["action"] == "updated"
    assert guest.run("cat /sys/module/toa/parameters/kinds").strip() == "254,253"


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_new_host_keys_only_with_the_explicit_flag(fleet, releases, tmp_path):
    new, _old = releases
    guest = fleet[0]
    nodes = _nodes_file(tmp_path / "nodes.txt", fleet, guest.node_line())
    recorded = tmp_path / "new_known_hosts"
    base = ["--hosts", str(nodes), "--key", str(guest.key_path), "--known-hosts", str(recorded), "--json"]
    refused = toa("status", *base[:-3], "--json")
    assert refused.returncode == 1 and "host key" in json_items(refused, "status")[0]["error"]
    accepted = toa("status", *base, "--accept-new-host-keys")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert recorded.read_text() == guest.known_hosts.read_text()
    assert toa("status", *base).returncode == 0


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_preflight_refuses_before_upload_what_the_hosts_kernel_would_not_load(fleet, artifacts, tmp_path):
    """The host's kernel tree says it forces module signatures: the unsigned build is refused before
    anything reaches the host; without that tree the same deploy goes through."""
    full, _ = artifacts
    guest = fleet[1]
    release = guest.release
    guest.run(f"modprobe -r toa; rm -f /lib/modules/{release}/extra/toa.ko*; depmod -a {release}; "
              f"mkdir -p /lib/modules/{release}/build; echo CONFIG_MODULE_SIG_FORCE=y > /lib/modules/{release}/build/.config")
    try:
        result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist", str(full))
        row = hosts[guest.node_line()]
        assert result.returncode == 1 and row["action"] == "failed", row
        assert row["detail"].startswith(f"preflight signature check refused the toa.ko for {release}: the kernel "
                                        "refuses unsigned modules (CONFIG_MODULE_SIG_FORCE)"), row
        assert row["detail"].endswith("; nothing was uploaded"), row
        facts = _guest_facts(guest)
        assert (facts["srcversion"], facts["sha256"], facts["temp_names"]) == ("none", "none", 0)
        assert guest.run("ls -d /tmp/toa-deploy.* 2>/dev/null | wc -l").strip() == "0"
    finally:
        guest.run(f"rm -rf /lib/modules/{release}/build")
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist", str(full))
    assert hosts[guest.node_line()]["action"] == "installed", hosts


# ---------------------------------------------------------------- writes, rollback and hosts that hang, on real guests

def _without_toa(guest):
    """Take toa off a guest (unloaded, no module file, indexes rebuilt): a deploy then installs and loads it."""
    release = guest.release
    guest.run(f"modprobe -r toa; rm -f /lib/modules/{release}/extra/toa.ko*; depmod -a {release}")


@contextlib.contextmanager
def _without_systemd(guest):
    """The guest as detect sees a Debian host whose init is not systemd: an empty tmpfs hides
    /run/systemd, so deploy keeps toa's line in the shared /etc/modules (kind lines)."""
    guest.run("mount -t tmpfs -o size=1m,mode=755 toa-test-no-systemd /run/systemd")
    try:
        yield
    finally:
        guest.run("umount /run/systemd")


def _etc_modules_entry(release):
    return next(f for f in render.autoload_files(targets.get("debian-12"), release, init="sysv") if f.kind == "lines")


def _temp_names(guest, *directories):
    return guest.run(f"find {' '.join(directories)} -maxdepth 1 \\( -name '.*toa-new-*' -o -name '.toa.ko.new-*' \\) "
                     "| wc -l").strip()


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_full_disk_fails_the_host_alone_and_leaves_every_file_whole(fleet, artifacts, tmp_path):
    """/etc/modules-load.d on a tmpfs that is full: the autoload file cannot be written. The host fails
    in one line naming the write and the cause, its file is byte for byte what it was, no temp name is
    left, the rest of the deploy is rolled back, and the other hosts are deployed as usual."""
    full, _ = artifacts
    victim = fleet[1]
    _without_toa(victim)
    victim.run("mount -t tmpfs -o size=64k,mode=755 toa-test-full /etc/modules-load.d && "
               "printf '# written by hand\\ntoa\\n' > /etc/modules-load.d/toa.conf && "
               "chmod 600 /etc/modules-load.d/toa.conf && printf 'loop\\n' > /etc/modules-load.d/other.conf && "
               "{ dd if=/dev/zero of=/etc/modules-load.d/zz-filler bs=4k 2>/dev/null; true; }")
    listing = ("cd /etc/modules-load.d && sha256sum toa.conf other.conf && stat -c '%n %a %U %G' toa.conf other.conf; "
               "sha256sum /etc/modprobe.d/toa.conf 2>&1; ls -a /etc/modules-load.d")
    try:
        before = victim.run(listing)
        result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full))
        row = hosts[victim.node_line()]
        assert result.returncode == 1 and row["action"] == "failed", row
        assert "cannot write /etc/modules-load.d/toa.conf" in row["detail"], row
        assert "No space left on device" in row["detail"] and row["detail"].endswith("; rolled back"), row
        assert "\n" not in row["detail"]
        assert victim.run(listing) == before
        assert _temp_names(victim, "/etc/modules-load.d", "/etc/modprobe.d", f"/lib/modules/{victim.release}/extra") == "0"
        facts = _guest_facts(victim)
        assert (facts["srcversion"], facts["sha256"]) == ("none", "none")
        for guest in (fleet[0], fleet[2]):
            assert hosts[guest.node_line()]["action"] in ("installed", "updated", "unchanged"), hosts
            assert _guest_facts(guest)["srcversion"] == find_artifact(full, guest.release).srcversion
    finally:
        victim.run("umount /etc/modules-load.d")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_shared_files_mode_and_owner_are_kept(fleet, artifacts, tmp_path):
    full, _ = artifacts
    guest = fleet[2]
    original = guest.run("cat /etc/modules")
    guest.run("cp -a /etc/modules /run/toa-test-modules && chown root:adm /etc/modules && chmod 640 /etc/modules")
    try:
        with _without_systemd(guest):
            result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist", str(full))
            row = hosts[guest.node_line()]
            assert result.returncode == 0 and "write /etc/modules" in row["changes"], row
            assert guest.run("stat -c '%F %a %U %G' /etc/modules").strip() == "regular file 640 root adm"
            assert guest.run("cat /etc/modules") == _etc_modules_entry(guest.release).merge(original)
            assert _temp_names(guest, "/etc") == "0"
    finally:
        guest.run("cp -a /run/toa-test-modules /etc/modules")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_symlinked_etc_modules_is_merged_where_it_points(fleet, artifacts, tmp_path):
    full, _ = artifacts
    guest = fleet[2]
    original = "# /etc/modules: kernel modules to load at boot time.\nloop\n"
    guest.run(f"cp -a /etc/modules /run/toa-test-modules && printf %s {shlex.quote(original)} > /etc/modules.real && "
              "chown root:adm /etc/modules.real && chmod 640 /etc/modules.real && ln -sfn modules.real /etc/modules")
    try:
        with _without_systemd(guest):
            args = _fleet_args(tmp_path, fleet, guest.node_line())
            result, hosts = _deploy_json(*args, "--dist", str(full))
            row = hosts[guest.node_line()]
            assert result.returncode == 0 and "write /etc/modules" in row["changes"], row
            assert guest.run("readlink /etc/modules").strip() == "modules.real"
            assert guest.run("stat -c '%F %a %U %G' /etc/modules.real").strip() == "regular file 640 root adm"
            assert guest.run("cat /etc/modules") == _etc_modules_entry(guest.release).merge(original)
            assert _temp_names(guest, "/etc") == "0"
            result, hosts = _deploy_json(*args, "--dist", str(full))
            assert hosts[guest.node_line()]["action"] == "unchanged", hosts
    finally:
        guest.run("rm -f /etc/modules /etc/modules.real && cp -a /run/toa-test-modules /etc/modules")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_output_a_host_should_not_print_fails_that_host_alone_in_one_line(fleet, artifacts, tmp_path):
    """A host whose stat prints what no stat prints: the module state, read with the facts, cannot be
    read. That host fails with one line naming it and the phase; the others are deployed."""
    full, _ = artifacts
    guest = fleet[0]
    guest.run("printf '#!/bin/sh\\necho not-a-mode\\n' > /usr/sbin/stat && chmod 755 /usr/sbin/stat")
    try:
        result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full))
    finally:
        guest.run("rm -f /usr/sbin/stat")
    row = hosts[guest.node_line()]
    assert result.returncode == 1 and row["action"] == "failed", row
    assert row["detail"].startswith(f"unexpected output from {guest.node_line()} (reading the facts): "
                                    "unexpected line '@@file "), row
    assert " not-a-mode " in row["detail"] and row["detail"].endswith("not a line the state command prints"), row
    assert {hosts[g.node_line()]["action"] for g in fleet[1:]} <= {"installed", "updated", "unchanged"}, hosts


FLATCAR_OS_RELEASE = Path(__file__).parent / "fixtures" / "roots" / "flatcar" / "usr" / "lib" / "os-release"


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_coreos_host_is_rolled_back_with_insmod_of_its_own_file(fleet, artifacts, failing_dist, tmp_path):
    """A guest that detect takes for Flatcar (its os-release): toa.ko lives in /var/lib/toa and is
    loaded by insmod. A build that fails to load is rolled back by loading the previous file again
    with insmod; no modprobe could, as no toa is left under /lib/modules."""
    full, _ = artifacts
    guest = fleet[0]
    release = guest.release
    good = find_artifact(full, release)
    module_file = f"/var/lib/toa/{release}/toa.ko"
    _without_toa(guest)
    guest.run(f"printf %s {shlex.quote(FLATCAR_OS_RELEASE.read_text())} > /run/toa-test-os-release && "
              "mount --bind /run/toa-test-os-release /etc/os-release")
    try:
        args = _fleet_args(tmp_path, fleet, guest.node_line())
        result, hosts = _deploy_json(*args, "--dist", str(full))
        assert result.returncode == 0 and hosts[guest.node_line()]["action"] == "installed", hosts
        loaded = f"cat /sys/module/toa/srcversion /sys/module/toa/parameters/kinds; sha256sum < {module_file}"
        before = guest.run(loaded)
        assert before.split()[:2] == [good.srcversion, "254,253"] and before.split()[2] == good.sha256
        assert guest.run(f"ls /lib/modules/{release}/extra/toa.ko 2>/dev/null | wc -l").strip() == "0"

        result, hosts = _deploy_json(*args, "--dist", str(failing_dist))
        row = hosts[guest.node_line()]
        assert result.returncode == 1 and "loading toa failed" in row["detail"], row
        assert row["detail"].endswith("; rolled back"), row
        assert guest.run(loaded) == before
        assert _temp_names(guest, f"/var/lib/toa/{release}", "/etc/systemd/system") == "0"
    finally:
        guest.run("umount /etc/os-release; rmmod toa; rm -rf /var/lib/toa /etc/systemd/system/toa.service "
                  "/etc/systemd/system/sysinit.target.wants/toa.service")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_frozen_guest_fails_alone_within_the_command_timeout(fleet, artifacts, tmp_path):
    """SIGSTOP on a guest's QEMU right after toa.ko is renamed into place: its TCP peer stays open and
    silent. The host fails alone within about the command timeout (not when TCP gives up), its
    rollback's one reconnect fails too; thawed, the guest holds only whole files and the next run
    completes it and removes the frozen run's staging directory."""
    full, _ = artifacts
    victim = fleet[1]
    _without_toa(victim)
    timeout = 20
    frozen = {}

    def freeze(host, step):
        if host == victim.node_line() and step == "installed" and not frozen:
            os.kill(victim.process.pid, signal.SIGSTOP)
            frozen["at"] = time.monotonic()

    nodes = [Node(HostSpec("127.0.0.1", "root", g.port)) for g in fleet]
    options = DeployOptions(dist=full, command_timeout=timeout, ssh=SshOptions(
        key_filename=str(victim.key_path), known_hosts=str(_known_hosts(tmp_path / "known_hosts", fleet))))
    try:
        results = deploy(nodes, options, progress=freeze)
        waited = time.monotonic() - frozen["at"]
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    print(f"frozen guest reported after {waited:.1f} s (command timeout {timeout} s)")
    assert results[1].action == "failed", results
    assert results[1].detail.startswith(f"no answer from 127.0.0.1 within {timeout} s (applying the plan)"), results[1]
    assert "reconnecting to read its outcome failed" in results[1].detail and "\n" not in results[1].detail
    assert {results[0].action, results[2].action} <= {"installed", "updated", "unchanged"}, results
    assert waited < timeout * 4 + 60

    victim.wait_for_ssh()
    artifact = find_artifact(full, victim.release)
    facts = _guest_facts(victim)
    assert facts["temp_names"] == 0 and facts["sha256"] in ("none", artifact.sha256), facts
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full))
    row = hosts[victim.node_line()]
    if row["action"] == "failed":  # the thawed apply still runs: no second one beside it
        assert row["detail"].startswith(f"an earlier run's apply is still going on on {victim.node_line()} "
                                        "(/tmp/toa-deploy."), row
        victim.run("i=0; while ! grep -qs '^@@end' /tmp/toa-deploy.*/log && [ $i -lt 120 ]; do sleep 1; "
                   "i=$((i + 1)); done")
        result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet), "--dist", str(full))
    assert result.returncode == 0, result.stdout + result.stderr
    assert _guest_facts(victim) == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                                    "autoload": _rendered(victim.release)}
    # the frozen run's log, never read, went with the next run's apply
    assert victim.run("ls -d /tmp/toa-deploy.* 2>/dev/null | wc -l").strip() == "0"


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_fresh_install_is_one_ssh_request_and_so_is_a_second_run(fleet, artifacts, tmp_path, monkeypatch):
    """Every exec (and SFTP) request the client sends to the guest's sshd is counted: one, the facts
    (with the preflight's reading) whose command then runs the apply script carrying toa.ko; then
    the facts alone."""
    import paramiko

    full, _ = artifacts
    guest = fleet[1]
    _without_toa(guest)
    requests = []
    real_exec, real_subsystem = paramiko.Channel.exec_command, paramiko.Channel.invoke_subsystem

    def exec_command(channel, command):
        requests.append(("exec", command.split()[0]))
        return real_exec(channel, command)

    def invoke_subsystem(channel, name):
        requests.append(("subsystem", name))
        return real_subsystem(channel, name)

    monkeypatch.setattr(paramiko.Channel, "exec_command", exec_command)
    monkeypatch.setattr(paramiko.Channel, "invoke_subsystem", invoke_subsystem)
    nodes = [Node(HostSpec("127.0.0.1", "root", guest.port))]
    options = DeployOptions(dist=full, ssh=SshOptions(
        key_filename=str(guest.key_path), known_hosts=str(_known_hosts(tmp_path / "known_hosts", fleet))))
    [result] = deploy(nodes, options)
    assert result.action == "installed", result
    assert len(requests) == 1, requests
    artifact = find_artifact(full, guest.release)
    assert _guest_facts(guest) == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                                   "autoload": _rendered(guest.release)}
    assert guest.run("ls -d /tmp/toa-deploy.* 2>/dev/null | wc -l").strip() == "0"
    requests.clear()
    [again] = deploy(nodes, options)
    assert again.action == "unchanged" and len(requests) == 1, (again, requests)


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_connection_dropped_in_the_apply_leaves_the_host_updated_or_rolled_back(fleet, artifacts, tmp_path,
                                                                                   monkeypatch):
    """The connection is cut (its socket shut down) once the script says toa.ko is in place: the
    script goes on to its end on the host, and the one reconnect reads its outcome there."""
    import socket

    full, _ = artifacts
    guest = fleet[1]
    _without_toa(guest)
    opened = []

    class Tracked(Host):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    # where deploy_host opens the run's connection, and where Host.reconnect opens the new one
    monkeypatch.setattr("toa.deploy.fleet.Host", Tracked)
    monkeypatch.setattr("toa.deploy.host.Host", Tracked)
    dropped = []

    def drop(host, step):
        if step == "installed" and not dropped:
            opened[-1].conn.transport.sock.shutdown(socket.SHUT_RDWR)
            dropped.append(step)

    nodes = [Node(HostSpec("127.0.0.1", "root", guest.port))]
    options = DeployOptions(dist=full, ssh=SshOptions(
        key_filename=str(guest.key_path), known_hosts=str(_known_hosts(tmp_path / "known_hosts", fleet))))
    [result] = deploy(nodes, options, progress=drop)
    assert dropped and len(opened) == 2, (dropped, opened)  # the run's connection, and the one reconnect
    print(f"after the drop: {result.action}: {result.detail}")
    artifact = find_artifact(full, guest.release)
    facts = _guest_facts(guest)
    if result.action == "installed":
        assert facts == {"srcversion": artifact.srcversion, "sha256": artifact.sha256, "temp_names": 0,
                         "autoload": _rendered(guest.release)}
    else:
        assert result.action == "failed" and result.detail.endswith("; rolled back"), result
        assert facts == {"srcversion": "none", "sha256": "none", "temp_names": 0,
                         "autoload": ["none"] * len(_rendered(guest.release))}
    assert guest.run("ls -d /tmp/toa-deploy.* 2>/dev/null | wc -l").strip() == "0"


# ---------------------------------------------------------------- one round trip for the facts, one script for the apply

OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'
OTHER = "6.1.0-41-amd64"


def _facts_output(uid="1000", *, state=True, tree=""):
    """What facts_command prints on a bookworm host: the platform, then the state (both targets'
    module paths read), then the preflight's tree."""
    lines = [f"@@toa-uid {uid}", "@@toa-file /etc/os-release", OS_RELEASE, f"@@toa-kernel {RELEASE}",
             "@@toa-pid1 systemd", "@@toa-systemd", f"@@toa-installed {RELEASE}", f"@@toa-installed {OTHER}"]
    if state:
        lines += [STATE_BEGINS, f"@@loaded {SRCVERSION}",
                  f"@@module {MODULE_FILE}", f"@@installed {SHA256} {SRCVERSION}", "@@indexed",
                  f"@@module /var/lib/toa/{RELEASE}/toa.ko", f"@@installed {'6' * 64}",
                  f"@@stale /var/lib/toa/{RELEASE}/.toa.ko.new-0123abcd", "@@resolved m L3Zhci9saWIvdG9hL3g=",
                  "@@module -", f"@@other {OTHER} {'7' * 64} /var/lib/toa/{OTHER}/toa.ko"]
        if tree is not None:
            lines += [TREE_BEGINS, tree]
    return "\n".join(lines) + "\n"


def test_the_facts_are_one_command_and_the_hosts_own_target_picks_its_lines():
    command = facts_command(True, ("tcp_v4_syn_recv_sock",))
    # sudo for the state, for the apply that may follow, and to ask whether it may
    assert command.count("sudo -n") == 3 and "@@toa-nosudo" in command and detect.REMOTE_FACTS_COMMAND in command
    assert "sudo" not in facts_command(False)
    for layout in module_layouts():  # every target's place for toa.ko, for the host's own release
        assert layout.replace(RELEASE_SLOT, "${kr}") in command
    assert RELEASE_SLOT not in command and "tcp_v4_syn_recv_sock" in command
    facts = parse_facts(_facts_output(tree="@@config /boot/config-x\n@@set CONFIG_MODVERSIONS=y"), "deployer",
                        ("tcp_v4_syn_recv_sock",))
    assert facts.sudo and facts.platform.target.id == "debian-12" and facts.platform.kernel == RELEASE
    state = facts.state
    assert (state.installed_sha256, state.indexed, state.loaded_srcversion) == (SHA256, True, SRCVERSION)
    assert state.stale == [] and state.module_resolved is None  # the coreos place's lines are not this host's
    assert state.others == {OTHER: (None, f"/var/lib/toa/{OTHER}/toa.ko")}  # not toa's own place on debian-12
    assert facts.tree.startswith("@@config /boot/config-x") and facts.symbols == ("tcp_v4_syn_recv_sock",)
    assert parse_facts(_facts_output("0", tree=None), "root").sudo is False


@pytest.mark.parametrize("tag, words", [("@@toa-notroot", "is not root and sudo=no"),
                                        ("@@toa-nosudo", "cannot run `sudo -n` without a password")])
def test_a_login_that_cannot_become_root_is_one_line(tag, words):
    with pytest.raises(HostRefused, match=words):
        parse_facts(_facts_output(state=False) + tag + "\n", "deployer")


def test_facts_without_their_state_are_an_error():
    with pytest.raises(ToaError, match="printed no state"):
        parse_facts(_facts_output(state=False), "root")


def _fresh_plan(tmp_path, others=()):
    ko = tmp_path / "toa.ko"
    ko.write_bytes(b"\x7fELF not a real module")
    artifact = Artifact(ko, {"kernel_release": RELEASE, "target": "debian-12",
                             "sha256": hashlib.sha256(ko.read_bytes()).hexdigest(), "srcversion": SRCVERSION})
    state = parse_state(RECORDED["fresh"], FILES)
    plan = make_plan(state, artifact, FILES, MODULE_FILE, None)
    return artifact, state, plan, apply_script(plan, artifact, MODULE_FILE, wanted_parameters(None),
                                               state, list(others))


@pytest.mark.parametrize("change, verified", [
    ("", True),
    ("@@rmmod rmmod: ERROR: Module toa is in use\n", False),
    ("s/@@exit 0/@@exit 1/", False),
    ("s/TOA: toa loaded/TOA: something else/", False),
    (f"s/{RECORDED_SRCVERSION}/{'F' * 23}/", False),
    ("s/kinds 254,200/kinds 254/", False),
    ("@@parameter trusted 10.0.0.0/8\n", False),  # recorded without trusted: not shown counts as empty
])
def test_the_scripts_own_load_check_agrees_with_check_load(tmp_path, change, verified):
    """The shell check that decides the rollback, run by sh on load_command's recorded output."""
    output = RECORDED["reload"]
    if change.startswith("@@"):
        output = change + output
    elif change:
        output = subprocess.run(["sed", change], input=output, text=True, capture_output=True, check=True).stdout
    (tmp_path / "load").write_text(output)
    wanted = {"kinds": "254,200", "trusted": ""}
    artifact = _artifact(srcversion=RECORDED_SRCVERSION)
    script = f"d={shlex.quote(str(tmp_path))}\n" + _load_check_script(artifact, wanted)
    assert (_sh(script).returncode == 0) is verified
    try:
        check_load(parse_load(output), artifact, wanted)
        assert verified
    except ToaError:
        assert not verified


def test_a_module_changed_after_it_was_found_is_not_sent(tmp_path):
    ko = tmp_path / "toa.ko"
    ko.write_bytes(b"\x7fELF built")
    payload = Payload(ko, hashlib.sha256(b"\x7fELF built").hexdigest(), 0, ko.stat().st_size)
    assert ApplyScript("true\n", (payload,)).upload() == b"\x7fELF built" + b"true\n"
    ko.write_bytes(b"\x7fELF other")  # same size, another build
    with pytest.raises(ToaError, match="changed since it was found"):
        ApplyScript("true\n", (payload,)).upload()


def test_the_apply_is_one_script_with_its_rollback_and_the_module_on_its_stdin(tmp_path):
    artifact, state, plan, script = _fresh_plan(tmp_path)
    checked = subprocess.run(["sh", "-n"], input=script.text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    text = script.text
    # each step of the plan, in order, and the undo of each in reverse, guarded by whether it started
    order = [text.index(f"echo '@@step {name}'") for name in ("upload", "depmod", "load", "autoload")]
    assert order == sorted(order)
    assert text.count("echo '@@step autoload'") == 1 and len(plan.files) > 1  # the files: one step
    assert text.index("@@undo removing /etc/modprobe.d/toa.conf") < text.index("@@undo restoring the previous toa.ko") \
        < text.index("@@undo unloading toa")
    assert f'[ "$src" = {SRCVERSION} ]' in text
    assert script.payloads == (Payload(artifact.ko, artifact.sha256, 0, artifact.ko.stat().st_size),)
    assert script.upload() == artifact.ko.read_bytes() + text.encode()
    assert f"head -c {artifact.ko.stat().st_size}" in text and artifact.sha256 in text
    other = OtherKernel(OTHER, "next boot", artifact, f"/lib/modules/{OTHER}/extra/toa.ko", None)
    _, _, _, with_other = _fresh_plan(tmp_path, [other])
    assert [p.offset for p in with_other.payloads] == [0, artifact.ko.stat().st_size]
    assert f"depmod -a {OTHER}" in with_other.text and "@@undo restoring toa.ko of " + OTHER in with_other.text


def test_the_apply_command_checks_its_upload_and_detaches_the_script():
    checked = subprocess.run(["sh", "-n", "-c", APPLY_COMMAND], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert "trap '' HUP PIPE" in APPLY_COMMAND
    assert 'sha256sum < "$d/apply.sh"' in APPLY_COMMAND


def test_a_lost_runs_staging_directory_is_stale_and_only_toas_names_are_removed(tmp_path):
    """Staging directories under /tmp (real ones, made here): an ended apply's, a dead apply's and an
    hour-old one without a pid are stale; a live apply's is busy; a fresh one without a pid (being made)
    and a symlink are neither. The plan removes only names toa makes."""
    import secrets

    kinds = ("ended", "live", "dead", "old", "new", "link")
    made = {kind: f"{STAGING_PREFIX}{secrets.token_hex(8)}" for kind in kinds}
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    try:
        for kind in kinds[:-1]:
            os.mkdir(made[kind], 0o700)
        Path(made["ended"], "log").write_text("@@step installed\n@@end 0\n")
        Path(made["live"], "log").write_text("@@step installed\n")
        Path(made["live"], "pid").write_text(f"{os.getpid()} {boot}\n")
        Path(made["dead"], "pid").write_text(f"{dead} {boot}\n")
        subprocess.run(["touch", "-d", "2 hours ago", made["old"]], check=True)
        os.symlink(made["ended"], made["link"])
        listed = subprocess.run(["sh", "-c", _STAGING_STALE_LINE], capture_output=True, text=True, check=True)
    finally:
        for path in made.values():
            subprocess.run(["rm", "-rf", "--", path], check=True)
    found = {kind: line.split(" ", 1)[0] for line in listed.stdout.splitlines()
             for kind, path in made.items() if line.endswith(" " + path)}
    assert found == {"ended": "@@stale", "dead": "@@stale", "old": "@@stale", "live": "@@busy"}, listed.stdout
    state = parse_state("@@module -\n" + "".join(f"@@stale {path}\n" for path in [
        made["ended"], "/tmp/toa-deploy.x/../../etc", "/tmp/toa-deploy.abc", "/var/tmp/toa-deploy.0123456789"])
        + f"@@busy {made['live']}\n", [])
    assert state.busy == [made["live"]]
    artifact = _fresh_plan(tmp_path)[0]
    plan = make_plan(state, artifact, [], MODULE_FILE, None)
    assert plan.stale == (made["ended"],)
    assert f"rm -rf -- {made['ended']}" in apply_script(plan, artifact, MODULE_FILE, {}, state).text


def test_the_apply_command_refuses_to_run_beside_a_running_apply_and_a_lost_upload_is_said_at_once():
    """Real staging directories under /tmp: one whose apply runs (this process's pid) makes the apply
    command refuse in one line, after reading its input, and leave nothing; a reconnect that finds no
    directory says at once that the apply never started."""
    import secrets

    running, mine = (f"{STAGING_PREFIX}{secrets.token_hex(8)}" for _ in range(2))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    files, script = b"\x7fELF payload", b'echo "applied $(cat "$1/in" | head -c 4 | tail -c 3)"\necho @@end\n'

    def apply(upload: bytes) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", APPLY_COMMAND, "toa-apply", mine.removeprefix(STAGING_PREFIX),
                               str(len(files)), hashlib.sha256(script).hexdigest()],
                              input=upload, capture_output=True, timeout=60)
    try:
        os.mkdir(running, 0o700)
        Path(running, "pid").write_text(f"{os.getpid()} {boot}\n")
        refused = apply(files + script)
        left = os.path.exists(mine)
    finally:
        subprocess.run(["rm", "-rf", "--", running, mine], check=True)
    assert refused.returncode == 1 and refused.stderr.decode().splitlines() == [
        f"an earlier run's apply is still going on ({running}): run deploy again once it has ended"], refused
    assert not left
    short = apply(files + script[:-3])  # cut short: the script's sha256 is not the one sent
    assert short.returncode == 1 and short.stderr.decode().splitlines() == [
        "the upload arrived damaged or cut short: run again"] and not os.path.exists(mine)
    ran = apply(files + script)
    assert ran.returncode == 0 and ran.stdout.decode().splitlines() == ["applied ELF", "@@end", "@@toa-collected"]
    assert not os.path.exists(mine)
    collected = subprocess.run(["sh", "-c", _collect_command(mine.removeprefix(STAGING_PREFIX))],
                               capture_output=True, text=True, timeout=10)
    assert collected.stdout.splitlines() == [NOT_STARTED]


def test_the_facts_command_waits_for_the_apply_and_runs_it_on_the_same_input():
    """The facts command run by sh here (as root): the facts, the line that ends them, then with an
    apply line and the upload on its stdin the apply command's whole run; at end of input instead,
    nothing more (exit 0)."""
    import secrets

    token = secrets.token_hex(8)
    files, script = b"\x7fELF payload", b'echo "applied $(head -c 4 "$1/in" | tail -c 3)"\necho @@end\n'
    line = f"apply {token} {len(files)} {hashlib.sha256(script).hexdigest()}\n".encode()
    command = ["sh", "-c", facts_command(False)]
    ran = subprocess.run(command, input=line + files + script, capture_output=True, timeout=120)
    facts, end, applied = ran.stdout.decode().partition("\n@@toa-facts-end\n")
    assert ran.returncode == 0 and end and STATE_BEGINS in facts, ran
    assert applied.splitlines() == ["applied ELF", "@@end", "@@toa-collected"]
    assert not os.path.exists(STAGING_PREFIX + token)
    alone = subprocess.run(command, input=b"", capture_output=True, timeout=120)
    assert alone.returncode == 0 and alone.stdout.decode().endswith("\n@@toa-facts-end\n")


def test_the_outcome_of_an_apply(tmp_path):
    artifact = _artifact()
    parameters = wanted_parameters(None)
    ok = parse_apply("@@step upload\n@@step installed\n@@result ok\n@@end\n")
    assert outcome_error(ok, artifact, parameters) is None
    full = parse_apply("@@step autoload\ncannot write /etc/modules-load.d/toa.conf: No space left on device\n"
                       "@@failed writing /etc/modules-load.d/toa.conf\n@@undo unloading toa\n"
                       "@@result rolled-back\n@@end\n")
    assert outcome_error(full, artifact, parameters) == (
        "writing /etc/modules-load.d/toa.conf: cannot write /etc/modules-load.d/toa.conf: No space left on device; "
        "rolled back")
    load = parse_apply("@@step load\n" + RECORDED["badload"] + "@@failed load toa\n"
                       "@@undo-failed restoring the previous toa.ko: toa.ko.prev is not the module this run replaced\n"
                       "@@result rollback-incomplete\n@@end\n")
    error = outcome_error(load, artifact, parameters)
    assert error.startswith("loading toa failed (exit 1)") and error.endswith(
        "; rollback incomplete: restoring the previous toa.ko: toa.ko.prev is not the module this run replaced")
    assert "ended without a result" in outcome_error(parse_apply("@@step upload\n"), artifact, parameters)


# ---------------------------------------------------------------- the next boot's kernel


def test_other_kernels_and_the_next_boot_are_read_from_the_state():
    platform = detect.Platform(family="debian", distro="debian", version="12", name="Debian 12", init="systemd",
                               kernel="5.10.0-30-amd64", target=targets.get("debian-12"),
                               installed_kernels=("5.10.0-30-amd64", "6.1.0-40-amd64", "6.1.0-41-amd64"),
                               next_kernel="6.1.0-41-amd64", next_kernel_from="newest installed")
    assert other_kernels(platform, ("running", "next")) == {"6.1.0-41-amd64": "next boot"}
    assert other_kernels(platform, ("running", "installed", "next")) == {
        "6.1.0-40-amd64": "installed", "6.1.0-41-amd64": "next boot"}
    assert other_kernels(platform, ("running",)) == {}
    others = (("6.1.0-41-amd64", "/lib/modules/6.1.0-41-amd64/extra/toa.ko"),)
    command = state_command(MODULE_FILE, RELEASE, FILES, others)
    assert "/lib/modules/6.1.0-41-amd64/extra/toa.ko" in command
    state = parse_state(f"@@other 6.1.0-41-amd64 - -\n@@other 6.1.0-40-amd64 {SHA256} "
                        "/lib/modules/6.1.0-40-amd64/extra/toa.ko\n", FILES)
    assert state.others == {"6.1.0-41-amd64": (None, None),
                            "6.1.0-40-amd64": (SHA256, "/lib/modules/6.1.0-40-amd64/extra/toa.ko")}
    assert next_boot(platform, state) == "NO toa.ko: 6.1.0-41-amd64 boots without toa"
    state.others["6.1.0-41-amd64"] = (None, "/lib/modules/6.1.0-41-amd64/updates/dkms/toa.ko")
    assert next_boot(platform, state) == "toa.ko in place"
    state.others["6.1.0-41-amd64"] = (None, "/lib/modules/6.1.0-41-amd64/weak-updates/updates/toa.ko")
    assert next_boot(platform, state) == "toa.ko in place (weak-updates: a kABI-compatible kernel's)"
    for line in ("@@other 6.1.0-41-amd64 nothex -", "@@other ../x - -", "@@other 6.1.0-41-amd64 - relative/toa.ko"):
        with pytest.raises(ToaError, match="unexpected line"):
            parse_state(line + "\n", FILES)


def test_bad_kernels_choice_is_one_line(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("root@192.0.2.1\n")
    for value in ("next", "running,later", ""):
        assert_one_line_error(toa("deploy", "--hosts", str(nodes), "--kernels", value), "invalid --kernels")


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_the_next_boots_kernel_gets_toa_and_status_says_so(fleet, guest_kernels, releases, artifacts, tmp_path):
    new, old = releases
    guest = next(g for g in fleet if g.release == old)
    args = _fleet_args(tmp_path, [guest])
    # the newer kernel installed beside the running one (its module indexes; GRUB would boot it next)
    new_modules = next(tree for tree in guest_kernels if tree.release == new).modules_dir
    guest.run(f"mkdir -p /lib/modules/{new}")
    with guest.connect() as conn:
        for name in ("modules.order", "modules.builtin"):
            conn.put(str(new_modules / name), f"/lib/modules/{new}/{name}")
    try:
        full, _ = artifacts
        before = json_items(toa("status", *args, "--dist", str(full), "--json"), "status")[0]
        assert (before["next_kernel"], before["next_boot"]) == (new, f"NO toa.ko: {new} boots without toa")

        result, hosts = _deploy_json(*args, "--dist", str(full), "--dry-run")
        assert f"install toa.ko for {new} (next boot)" in hosts[guest.node_line()]["changes"]
        assert guest.run(f"ls /lib/modules/{new}").split() == ["modules.builtin", "modules.order"]

        result, hosts = _deploy_json(*args, "--dist", str(full))
        assert result.returncode == 0, result.stdout
        assert f"install toa.ko for {new} (next boot)" in hosts[guest.node_line()]["detail"]
        built = find_artifact(full, new)
        assert guest.run(f"sha256sum /lib/modules/{new}/extra/toa.ko").split()[0] == built.sha256
        assert "extra/toa.ko:" in guest.run(f"cat /lib/modules/{new}/modules.dep")  # indexed for that kernel
        assert guest.run("cat /sys/module/toa/srcversion").strip() == find_artifact(full, old).srcversion

        after = json_items(toa("status", *args, "--dist", str(full), "--json"), "status")[0]
        assert after["next_boot"] == "toa.ko in place"
        _, hosts = _deploy_json(*args, "--dist", str(full))
        assert hosts[guest.node_line()]["action"] == "unchanged"

        # a dist without that kernel's build: the running kernel is served, the next boot is named
        guest.run(f"rm -rf /lib/modules/{new}/extra")
        old_only = tmp_path / "old-only"
        found = find_artifact(full, old)
        shutil.copytree(found.ko.parent, old_only / found.ko.parent.parent.name / old)
        result, hosts = _deploy_json(*args, "--dist", str(old_only))
        assert result.returncode == 0
        assert f"{new} (next boot) has no toa.ko: build it (--build-missing)" in hosts[guest.node_line()]["detail"]
        # and what apt runs when a kernel is installed says so too (deploy wrote the hook)
        assert f"toa: kernel {new} has no toa.ko" in guest.run(f"/etc/kernel/postinst.d/zz-toa {new} 2>&1")
    finally:
        guest.run(f"rm -rf /lib/modules/{new}")
