"""invoke deploy / status: pure tests of the fact parsers and the plan on output recorded from a real
guest, then a real fleet: three QEMU guests booting real Debian kernels (two 6.1, one 5.10) with
systemd and sshd, deployed to over SSH with the real command."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, toa
from toa import deploy, render, targets
from toa.errors import ToaError
from toa.nodes import Node
from toa.remote import HostSpec, SshOptions

RELEASE = "6.1.0-56-amd64"
MODULE_FILE = f"/lib/modules/{RELEASE}/extra/toa.ko"
FILES = render.autoload_files(targets.get("debian-12"), RELEASE, init="systemd")
SRCVERSION = "0123456789ABCDEF0123456"
SHA256 = "5" * 64


def _artifact(sha256=SHA256, srcversion=SRCVERSION):
    return deploy.Artifact(Path("dist/debian-12") / RELEASE / "toa.ko", RELEASE, "debian-12", sha256, srcversion)


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
    state = deploy.parse_state(RECORDED["fresh"], FILES)
    assert state == deploy.ModuleState(files={f.path: None for f in FILES})
    plan = deploy.make_plan(state, _artifact(), FILES, MODULE_FILE, None)
    assert (plan.install, plan.depmod, plan.load, plan.stale) == (True, True, "load", ())
    assert [change.entry.path for change in plan.files] == [f.path for f in FILES]
    assert all(change.previous is None for change in plan.files)


def test_state_of_a_deployed_host_with_leftovers():
    state = deploy.parse_state(RECORDED["deployed"], FILES)
    assert state.loaded and state.loaded_srcversion == RECORDED_SRCVERSION
    assert state.parameters == {"kinds": "254,253"}
    assert state.installed_srcversion == RECORDED_SRCVERSION and state.indexed
    assert state.stale == [f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd",
                           "/etc/modprobe.d/.toa.conf.toa-new-deadbeef"]
    for entry in FILES:
        assert state.files[entry.path] == deploy.Current("file", entry.content, 0o644)
    artifact = _artifact(RECORDED_SHA256, RECORDED_SRCVERSION)
    plan = deploy.make_plan(state, artifact, FILES, MODULE_FILE, None)
    assert plan == deploy.Plan(stale=tuple(state.stale))  # only the leftovers to clean
    state.stale.clear()
    assert deploy.make_plan(state, artifact, FILES, MODULE_FILE, None).empty


def test_plan_reloads_for_another_build_or_other_options():
    state = deploy.parse_state(RECORDED["deployed"], FILES)
    state.stale.clear()
    other_build = deploy.make_plan(state, _artifact(RECORDED_SHA256, "0" * 23), FILES, MODULE_FILE, None)
    assert (other_build.install, other_build.load, other_build.files) == (False, "reload", ())
    options = {"kinds": "254,200"}
    with_options = deploy.make_plan(state, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION),
                                    render.autoload_files(targets.get("debian-12"), RELEASE, options=options),
                                    MODULE_FILE, options)
    assert with_options.load == "reload"
    assert [change.entry.path for change in with_options.files] == ["/etc/modprobe.d/toa.conf"]
    new_file = deploy.make_plan(state, _artifact(SHA256, RECORDED_SRCVERSION), FILES, MODULE_FILE, None)
    assert (new_file.install, new_file.depmod, new_file.load) == (True, True, "reload")


def test_plan_deletes_only_temp_names_it_makes():
    state = deploy.ModuleState(stale=[
        "/etc/passwd", f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd/../../../../etc/shadow",
        f"/lib/modules/{RELEASE}/extra/.toa.ko.new-0123abcd x", "/etc/modprobe.d/.toa.conf.toa-new-deadbeef",
    ])
    plan = deploy.make_plan(state, _artifact(), FILES, MODULE_FILE, None)
    assert plan.stale == ("/etc/modprobe.d/.toa.conf.toa-new-deadbeef",)


def test_lines_file_merges_into_the_shared_file():
    etc_modules = render.autoload_files(targets.get("debian-12"), RELEASE, init="sysv")
    shared = next(entry for entry in etc_modules if entry.kind == "lines")
    state = deploy.ModuleState(files={shared.path: deploy.Current("file", "# /etc/modules\nloop\n", 0o644)})
    change = next(c for c in deploy.make_plan(state, _artifact(), etc_modules, MODULE_FILE, None).files
                  if c.entry is shared)
    assert change.text.startswith("# /etc/modules\nloop\n") and change.text.endswith(shared.content)
    state.files[shared.path] = deploy.Current("file", change.text, 0o644)
    assert shared.path not in [c.entry.path for c in deploy.make_plan(state, _artifact(), etc_modules,
                                                                       MODULE_FILE, None).files]


def test_load_output_of_a_reload():
    outcome = deploy.parse_load(RECORDED["reload"])
    assert outcome.exit_code == 0 and outcome.srcversion == RECORDED_SRCVERSION
    assert outcome.parameters == {"kinds": "254,200"}
    assert any("TOA: toa unloaded" in line for line in outcome.kernel_log)
    deploy.check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,200"})
    with pytest.raises(ToaError, match="srcversion"):
        deploy.check_load(outcome, _artifact(RECORDED_SHA256, "0" * 23), {"kinds": "254,200"})
    with pytest.raises(ToaError, match="wanted"):
        deploy.check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,253"})


def test_load_output_of_a_failed_modprobe():
    outcome = deploy.parse_load(RECORDED["badload"])
    assert outcome.exit_code not in (0, None)
    with pytest.raises(ToaError, match=r"^loading toa failed \(exit 1\): modprobe: ERROR: could not insert 'toa'"):
        deploy.check_load(outcome, _artifact(RECORDED_SHA256, RECORDED_SRCVERSION), {"kinds": "254,253"})


def test_a_kernel_that_wants_signed_modules_says_so():
    # modprobe's and the kernel's words when module.sig_enforce=1 (or Secure Boot) refuses toa.ko
    output = (
        "@@exit 1\n@@modprobe modprobe: ERROR: could not insert 'toa': Key was rejected by service\n"
        "@@log [   30.100000] toa-deploy: load 0011\n@@log [   30.200000] Loading of unsigned module is rejected\n"
    )
    with pytest.raises(ToaError) as error:
        deploy.check_load(deploy.parse_load(output), _artifact(), {})
    assert "only loads signed modules" in str(error.value) and "sign toa.ko" in str(error.value)


def test_commands_quote_what_they_carry():
    hostile = FILES + [render.AutoloadFile("/etc/it's $(here)", "x", 0o644)]
    command = deploy.state_command(MODULE_FILE, RELEASE, hostile)
    assert "f='/etc/it'\"'\"'s $(here)'" in command
    # the text travels as base64; the path is quoted once and used as "$p" after
    write = deploy._write_file_script("/etc/it's $(here)", "file", "options toa kinds=254 `reboot`\n", 0o644)
    assert "`reboot`" not in write and write.count("$(here)") == 1 and "p='/etc/it'\"'\"'s $(here)'" in write
    link = deploy._write_file_script("/etc/it's $(here)", "symlink", "../$(reboot)", 0o777)
    assert "ln -s -- '../$(reboot)' \"$tmp\"" in link


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
    assert deploy.find_artifact(tmp_path, RELEASE, "ubuntu-22.04").ko == tmp_path / "ubuntu-22.04" / RELEASE / "toa.ko"
    assert deploy.find_artifact(tmp_path, RELEASE, "debian-12").target == "debian-12"
    assert deploy.find_artifact(tmp_path, "6.1.0-55-amd64") is None
    put("debian-11", "5.10.0-40-amd64", sha256="0" * 64)
    with pytest.raises(ToaError, match="does not match the sha256"):
        deploy.find_artifact(tmp_path, "5.10.0-40-amd64")
    with pytest.raises(ToaError, match="invalid kernel release"):
        deploy.find_artifact(tmp_path, "*")


def _node(name):
    return Node(HostSpec(name))


def test_batches_stop_after_max_fail():
    seen, lock = [], threading.Lock()

    def work(node):
        with lock:
            seen.append(node.spec.host)
        return deploy.HostResult(node.name, action="failed" if node.spec.host.startswith("bad") else "installed")

    nodes = [_node(n) for n in ("bad1", "ok1", "bad2", "ok2", "ok3", "ok4")]
    results = deploy.run_fleet(nodes, work, parallel=2, batch=2, max_fail=1)
    assert [r.action for r in results] == ["failed", "installed", "failed", "installed", "skipped", "skipped"]
    assert sorted(seen) == ["bad1", "bad2", "ok1", "ok2"]
    assert "more than --max-fail 1" in results[-1].detail
    assert [r.action for r in deploy.run_fleet(nodes, work, parallel=3)] == [
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
    assert json.loads(result.stdout)["dry_run"] is True
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
    found = deploy.find_artifact(dist, new)
    shutil.copytree(found.ko.parent, partial / found.ko.parent.parent.name / new)
    return dist, partial


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
    return result, {host["host"]: host for host in json.loads(result.stdout)["hosts"]}


def _guest_facts(guest):
    """What a guest has: loaded srcversion, module file hash, temp names, autoload files."""
    out = guest.run(
        "cat /sys/module/toa/srcversion 2>/dev/null || echo none; "
        "sha256sum /lib/modules/$(uname -r)/extra/toa.ko 2>/dev/null | cut -d' ' -f1 | grep . || echo none; "
        "find /lib/modules/$(uname -r)/extra /etc/modules-load.d /etc/modprobe.d -name '.*toa*' | wc -l; "
        "for f in /etc/modules-load.d/toa.conf /etc/modprobe.d/toa.conf; do "
        "if [ -f $f ]; then base64 -w0 < $f; echo; else echo none; fi; done"
    ).split("\n")
    return {"srcversion": out[0], "sha256": out[1], "temp_names": int(out[2]), "autoload": out[3:5]}


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
    artifact = deploy.find_artifact(only_new, new)
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
    assert _guest_facts(fleet[1]) == {"srcversion": "none", "sha256": "none", "temp_names": 0,
                                      "autoload": ["none", "none"]}


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
    options = deploy.DeployOptions(dist=full, ssh=SshOptions(
        key_filename=str(victim.key_path), known_hosts=str(_known_hosts(tmp_path / "known_hosts", fleet))))
    results = deploy.deploy(nodes, options, progress=pull_the_plug)
    assert [r.action for r in results] == ["unchanged", "failed", "unchanged"], results
    assert not victim.is_running()

    victim.start()
    victim.wait_for_ssh()
    artifact = deploy.find_artifact(full, old)
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
    rows = {row["host"]: row for row in json.loads(status.stdout)["hosts"]}
    for guest in fleet:
        artifact = deploy.find_artifact(full, guest.release)
        row = rows[guest.node_line()]
        assert (row["kernel"], row["loaded"], row["loaded_srcversion"], row["installed_srcversion"],
                row["artifact"], row["autoload"], row["error"]) == (
            guest.release, True, artifact.srcversion, artifact.srcversion, "match", "complete", None)


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_a_failed_load_rolls_back_to_the_previous_module(fleet, guest_kernels, artifacts, tmp_path):
    from toa import build

    full, _ = artifacts
    guest, tree = fleet[0], guest_kernels[0]
    new = tree.release
    good = deploy.find_artifact(full, new)
    before = _guest_facts(guest)
    assert before == {"srcversion": good.srcversion, "sha256": good.sha256, "temp_names": 0,
                      "autoload": _rendered(new)}
    # the old kernel's build under the new kernel's name: the preflight refuses it before any upload
    wrong = deploy.find_artifact(full, guest_kernels[1].release)
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
    source = tmp_path / "module"
    shutil.copytree(build.MODULE_SOURCE, source, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd", "probes.h"))
    toa_c = (source / "toa.c").read_text()
    assert "static int __init toa_init(void)\n{\n" in toa_c
    (source / "toa.c").write_text(toa_c.replace("static int __init toa_init(void)\n{\n",
                                                "static int __init toa_init(void)\n{\n\tif (1)\n\t\treturn -ENODEV;\n"))
    failing = build.build_module(tree.headers_dir, new, tree.suite, tmp_path / "failing-dist", module_source=source)
    assert json.loads(failing.manifest.read_text())["srcversion"] != good.srcversion
    result, hosts = _deploy_json(*_fleet_args(tmp_path, fleet, guest.node_line()), "--dist",
                                 str(tmp_path / "failing-dist"))
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
    artifact = deploy.find_artifact(full, new)
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
    assert refused.returncode == 1 and "host key" in json.loads(refused.stdout)["hosts"][0]["error"]
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
