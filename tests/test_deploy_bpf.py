"""invoke deploy/status with the eBPF engine: pure tests of its facts, the engine choice and the plan,
then real QEMU guests (bookworm's and bullseye's newest Debian kernels, systemd and sshd) deployed to
over SSH with the real command: auto picks the engine, a reboot attaches it again before sshd starts,
the lab's own peer proves accept()/getpeername() rewritten, switching engines leaves exactly one, and
an engine the kernel refuses is rolled back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli import assert_one_line_error, json_items, toa
from toa import artifacts, detect, engine_bpf, lab, render, targets
from toa.deploy.bpf import _attach_bpf_script, check_bpf
from toa.deploy.facts import BpfState, Current, bpf_state_command, parse_bpf_state, parse_state, state_command
from toa.deploy.fleet import engine_summary
from toa.deploy.plan import _file_changes, choose_engine, make_bpf_plan, make_plan, same_parameters, wanted_parameters
from toa.errors import ToaError

RELEASE = "6.1.0-56-amd64"
MODULE_FILE = f"/lib/modules/{RELEASE}/extra/toa.ko"
MODULE_FILES = render.autoload_files(targets.get("debian-12"), RELEASE, init="systemd")
BPF_FILES = render.bpf_files()
OBJECT_SHA = "a" * 64
LOADER_SHA = "b" * 64


def _platform(kernel=RELEASE, init="systemd"):
    return detect.Platform(family="debian", distro="debian", version="12", name="Debian 12", init=init, kernel=kernel,
                           target=targets.get("debian-12"))



# `toa-bpf status` as toa/bpf/loader.c prints it, attached with the defaults and with options.
STATUS_ATTACHED = (
    f"object_sha256 {OBJECT_SHA}\n"
    "attached yes\n"
    "link toa_sockops prog_id=41 cgroup_id=1 attach_type=3\n"
    "link toa_peer4 prog_id=42 cgroup_id=1 attach_type=29\n"
    "link toa_peer6 prog_id=43 cgroup_id=1 attach_type=30\n"
    "kinds 254,253\n"
    "trusted \n"
    "loaded_programs 3\n"
    "loaded_maps 5\n"
)
STATUS_DETACHED = f"object_sha256 {OBJECT_SHA}\nattached no\nloaded_programs 0\nloaded_maps 0\n"


def _tagged(status: str) -> str:
    return "".join(f"@@bpfstatus {line}\n" for line in status.splitlines())


def _state(module_loaded=False, bpf_lines="", files=()):
    """A host's state as parse_state reads it: FILES (AutoloadFile) present with their rendered text."""
    import base64

    read = MODULE_FILES + BPF_FILES
    lines = ["@@loaded 8A22A252B656421042FCE4E", "@@parameter kinds 254,253"] if module_loaded else []
    for entry in files:
        index = read.index(entry)
        if entry.kind == "symlink":
            lines.append(f"@@symlink {index} {base64.b64encode(entry.content.encode()).decode()}")
        else:
            lines.append(f"@@file {index} {entry.mode:o} {base64.b64encode(entry.content.encode()).decode()}")
    return parse_state("\n".join(lines) + "\n" + bpf_lines, read)


ATTACHED = f"@@bpfloader {LOADER_SHA}\n" + _tagged(STATUS_ATTACHED) + "@@bpfpinned\n@@bpfunit active\n"
KERNEL_OK = "@@bpfconfig CONFIG_BPF_SYSCALL=y\n@@bpfconfig CONFIG_CGROUP_BPF=y\n@@bpfsyscall\n@@bpfcgroup2\n"


def test_the_engines_facts_are_parsed():
    bpf = parse_state(ATTACHED + KERNEL_OK, MODULE_FILES + BPF_FILES).bpf
    assert bpf == BpfState(loader_sha256=LOADER_SHA, pinned=True, attached=True, object_sha256=OBJECT_SHA,
                           links=3, parameters={"kinds": "254,253", "trusted": ""}, unit_active=True,
                           config={"CONFIG_BPF_SYSCALL": "y", "CONFIG_CGROUP_BPF": "y"}, bpf_syscall=True,
                           cgroup2=True)
    detached = parse_bpf_state(_tagged(STATUS_DETACHED))
    assert not detached.active and detached.links == 0


@pytest.mark.parametrize("line", ["@@bpfloader nothex", "@@bpfconfig CONFIG_BPF_SYSCALL=maybe", "@@bpfstatus kinds 1;2",
                                  "@@bpfstatus attached perhaps", "@@bpfunit inactive", "@@bpfwhat"])
def test_engine_lines_the_commands_do_not_print_are_errors(line):
    with pytest.raises(ToaError, match="unexpected line"):
        parse_state(line + "\n", MODULE_FILES)


def test_the_state_command_reads_the_engine_in_the_same_round_trip():
    command = bpf_state_command()
    assert f"l={render.BPF_LOADER}" in command and '"$l" status' in command
    assert "/proc/config.gz" in command


def test_the_state_command_tells_this_machines_kernel_as_it_is(tmp_path):
    """bpf_state_command run by sh here, with a kernel config in /boot (bound over it in a mount
    namespace of its own): the two options read whole, bpf() and cgroup2 as this kernel has them."""
    import os
    import shlex
    import subprocess

    if subprocess.run(["unshare", "-m", "--map-root-user", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m refused)")
    (tmp_path / f"config-{os.uname().release}").write_text(
        "CONFIG_BPF_SYSCALL=y\nCONFIG_BPF_SYSCALL_X=y\n# CONFIG_BPF_JIT is not set\nCONFIG_CGROUP_BPF=n\n")
    script = f"mount --bind {shlex.quote(str(tmp_path))} /boot && sh -c {shlex.quote(bpf_state_command())}"
    ran = subprocess.run(["unshare", "-m", "--map-root-user", "sh", "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    bpf = parse_bpf_state(ran.stdout)
    assert bpf.config == {"CONFIG_BPF_SYSCALL": "y", "CONFIG_CGROUP_BPF": "n"}
    assert bpf.bpf_syscall == Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists()
    assert bpf.cgroup2 == ("cgroup2" in Path("/proc/filesystems").read_text().split())


@pytest.mark.parametrize("kernel,init,facts,wanted,expected", [
    (RELEASE, "systemd", KERNEL_OK, "auto", "bpf"),
    ("5.10.0-40-amd64", "systemd", KERNEL_OK, "auto", "bpf"),
    ("5.4.0-150-generic", "systemd", KERNEL_OK, "auto", "module"),  # older than 5.10
    ("3.10.0-1160.el7.x86_64", "systemd", "", "auto", "module"),  # CentOS 7
    (RELEASE, "sysv", KERNEL_OK, "auto", "module"),  # no systemd to attach it at boot
    (RELEASE, "systemd", "@@bpfconfig CONFIG_CGROUP_BPF=n\n@@bpfsyscall\n@@bpfcgroup2\n", "auto", "module"),
    (RELEASE, "systemd", "@@bpfsyscall\n@@bpfcgroup2\n", "auto", "bpf"),  # no config file: the runtime signs
    (RELEASE, "systemd", "@@bpfcgroup2\n", "auto", "module"),  # no bpf() at all
    (RELEASE, "systemd", "", "module", "module"),
    (RELEASE, "systemd", KERNEL_OK, "bpf", "bpf"),
])
def test_the_engine_choice(kernel, init, facts, wanted, expected):
    bpf = parse_bpf_state(facts)
    assert choose_engine(_platform(kernel, init), bpf, wanted)[0] == expected


def test_an_explicit_bpf_the_host_cannot_run_is_refused_with_the_way_out():
    with pytest.raises(ToaError, match="older than 5.10.*--engine module"):
        choose_engine(_platform("5.4.0-150-generic"), parse_bpf_state(KERNEL_OK), "bpf")
    with pytest.raises(ToaError, match="--engine must be one of"):
        choose_engine(_platform(), BpfState(), "ebpf")


def test_bpf_plan_of_a_fresh_host():
    state = _state(bpf_lines=KERNEL_OK)
    plan = make_bpf_plan(state, LOADER_SHA, BPF_FILES, MODULE_FILES, None)
    assert (plan.install, plan.unload_module, plan.attach) == (True, False, "attach")
    assert [change.describe() for change in plan.files] == [f"write {render.BPF_UNIT}", f"write {render.BPF_WANTS_LINK}"]


def test_bpf_plan_of_a_module_host_takes_the_module_away():
    state = _state(module_loaded=True, bpf_lines=KERNEL_OK, files=MODULE_FILES)
    plan = make_bpf_plan(state, LOADER_SHA, BPF_FILES, MODULE_FILES, None)
    assert (plan.unload_module, plan.attach) == (True, "attach")
    removed = [change.entry.path for change in plan.files if change.text is None]
    assert removed == [entry.path for entry in MODULE_FILES]
    assert all(change.previous is not None for change in plan.files if change.text is None)  # the rollback's


def test_bpf_plan_when_attached_as_wanted_is_empty_and_new_options_are_set():
    state = _state(bpf_lines=ATTACHED + KERNEL_OK, files=BPF_FILES)
    assert make_bpf_plan(state, LOADER_SHA, BPF_FILES, MODULE_FILES, None).empty
    options = {"kinds": "254,200"}
    plan = make_bpf_plan(state, LOADER_SHA, render.bpf_files(options), MODULE_FILES, options)
    assert plan.attach == "set" and [c.describe() for c in plan.files] == [f"write {render.BPF_UNIT}"]
    # a new loader carries a new object: attached again
    assert make_bpf_plan(state, "c" * 64, BPF_FILES, MODULE_FILES, None).attach == "reattach"
    # attached by hand, not through the unit: handed to the unit
    by_hand = _state(bpf_lines=ATTACHED.replace("@@bpfunit active\n", ""), files=BPF_FILES)
    assert make_bpf_plan(by_hand, LOADER_SHA, BPF_FILES, MODULE_FILES, None).attach == "reattach"


def test_bpf_plan_deletes_only_temp_names_it_makes():
    ours = ["/usr/local/sbin/.toa-bpf.toa-new-0123abcd", "/etc/systemd/system/.toa-bpf.service.toa-new-deadbeef"]
    theirs = ["/usr/local/sbin/.toa-bpf.toa-new-../../x", "/usr/local/sbin/other", "/etc/passwd"]
    state = _state(bpf_lines="".join(f"@@stale {path}\n" for path in ours + theirs) + ATTACHED, files=BPF_FILES)
    plan = make_bpf_plan(state, LOADER_SHA, BPF_FILES, MODULE_FILES, None)
    assert plan.stale == tuple(ours) and plan.describe(None) == ["remove 2 temp file(s) of an interrupted run"]


def test_module_plan_on_a_bpf_host_detaches_it_and_removes_its_unit():
    state = _state(bpf_lines=ATTACHED, files=BPF_FILES)
    artifact = artifacts.Artifact(Path("x/toa.ko"), {"kernel_release": RELEASE, "target": "debian-12", "sha256": "5" * 64,
                                                     "srcversion": "0123456789ABCDEF0123456"})
    plan = make_plan(state, artifact, MODULE_FILES, MODULE_FILE, None, BPF_FILES)
    assert plan.detach_bpf and plan.load == "load"
    steps = plan.describe(artifact)
    assert steps.index("detach the eBPF engine") < steps.index("load toa")
    assert f"remove {render.BPF_UNIT}" in steps and f"remove {render.BPF_WANTS_LINK}" in steps
    # a host without the engine: nothing about it in the plan
    assert not make_plan(_state(), artifact, MODULE_FILES, MODULE_FILE, None, BPF_FILES).detach_bpf


def test_parameters_compare_as_networks():
    wanted = wanted_parameters({"trusted": "fd00:1::/64,100.64.0.0/10"})
    assert same_parameters({"kinds": "254,253", "trusted": "fd00:1:0:0::/64,100.64.0.0/10"}, wanted)
    assert not same_parameters({"kinds": "254,253", "trusted": "100.64.0.0/10"}, wanted)
    assert not same_parameters({"kinds": "254", "trusted": "fd00:1::/64,100.64.0.0/10"}, wanted)


def test_the_check_after_an_attach():
    good = _tagged(STATUS_ATTACHED) + "@@bpfpinned\n@@bpfunit active\n"
    check_bpf(good, OBJECT_SHA, wanted_parameters(None))
    for output, message in [
        (_tagged(STATUS_DETACHED), "did not attach"),
        (_tagged(STATUS_ATTACHED.replace("prog_id=43", "prog_id=0")) + "@@bpfunit active\n", "2 of 3"),
        (good, "wanted"),  # other options
        (good.replace("@@bpfunit active\n", ""), "not active"),
        (good + "@@loaded\n", "beside the eBPF engine"),
    ]:
        with pytest.raises(ToaError, match=message):
            check_bpf(output, OBJECT_SHA, wanted_parameters({"kinds": "254,200"} if message == "wanted" else None))
    with pytest.raises(ToaError, match="carries object"):
        check_bpf(good, "d" * 64, wanted_parameters(None))


def test_status_names_the_engine_and_its_counters():
    assert engine_summary(_state()) == ("none", None)
    assert engine_summary(_state(module_loaded=True)) == ("module", "/proc/net/toa_stats")
    assert engine_summary(_state(bpf_lines=ATTACHED)) == ("bpf", f"{render.BPF_LOADER} stats")
    assert engine_summary(_state(module_loaded=True, bpf_lines=ATTACHED))[0] == "module+bpf"


def test_scripts_quote_what_they_carry():
    script = _attach_bpf_script("set", wanted_parameters({"kinds": "254,200", "trusted": "10.0.0.0/8"}))
    assert f"{render.BPF_LOADER} set kinds=254,200 trusted=10.0.0.0/8" in script
    with pytest.raises(ToaError):
        wanted_parameters({"trusted": "10.0.0.0/8;reboot"})


def test_bad_engine_flag_is_a_one_line_error(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("root@127.0.0.1:1\n")
    assert_one_line_error(toa("deploy", "--hosts", str(nodes), "--engine", "ebpf"), "invalid --engine", "auto, bpf, module")



def test_a_symlink_the_state_command_reads_is_its_target_exactly(tmp_path):
    """The wants link as the real state command reads it (readlink's newline is not part of it), so
    a second deploy finds it in place."""
    import subprocess

    link = render.AutoloadFile(str(tmp_path / "sysinit.target.wants" / "toa-bpf.service"), "../toa-bpf.service",
                               0o777, "symlink")
    (tmp_path / "sysinit.target.wants").mkdir()
    (tmp_path / "sysinit.target.wants" / "toa-bpf.service").symlink_to("../toa-bpf.service")
    command = state_command(str(tmp_path / "toa.ko"), RELEASE, [link])
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    state = parse_state(output, [link])
    assert state.files[link.path] == Current("symlink", "../toa-bpf.service")
    assert _file_changes(state, [link]) == []


# ---------------------------------------------------------------- real guests

CASE_PREFIX = "CASE "


@pytest.fixture(scope="module")
def bpf_fleet(guest_kernels, tmp_path_factory):
    """Two guests: guest1 boots bookworm's newest kernel, guest2 bullseye's (5.10)."""
    from toa import guests

    with guests.fleet(guest_kernels, tmp_path_factory.mktemp("fleet"), count=2) as running:
        yield running


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """The lab's TOA peer (guest/toa_peer.c, static): real handshakes with TOA options through a TUN."""
    return lab.build_peer(tmp_path_factory.mktemp("peer"))


@pytest.fixture(scope="module")
def bpf_dist(tmp_path_factory):
    """A dist with the eBPF engine built in <dist>/bpf (as --build-missing builds it)."""
    dist = tmp_path_factory.mktemp("dist")
    engine_bpf.build(dist / "bpf")
    return dist


@pytest.fixture(scope="module")
def refused_dist(tmp_path_factory):
    """A dist whose object the verifier refuses on every kernel: a real build of toa.bpf.c with one
    read through a number, which compiles and which no kernel loads."""
    work = tmp_path_factory.mktemp("refused")
    source = work / "bpf"
    shutil.copytree(engine_bpf.SOURCE_DIR, source)
    text = (source / "toa.bpf.c").read_text()
    anchor = 'SEC("sockops")\nint toa_sockops(struct bpf_sock_ops *skops)\n{\n'
    assert anchor in text, "toa.bpf.c's sock_ops program moved: update this fixture"
    (source / "toa.bpf.c").write_text(text.replace(
        anchor, anchor + "\tif (skops->remote_port == 1)\n\t\treturn *(volatile int *)(unsigned long)skops->local_port;\n"))
    engine_bpf.build(work / "dist" / "bpf", source_dir=source)
    return work / "dist"


def _args(tmp_path, guest, user=None):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text(guest.node_line(user) + "\n")
    known = tmp_path / "known_hosts"
    known.write_text(guest.known_hosts.read_text())
    return ["--hosts", str(nodes), "--key", str(guest.key_path), "--known-hosts", str(known)]


def _deploy(tmp_path, guest, *args):
    result = toa("deploy", *_args(tmp_path, guest), *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result, json_items(result, "deploy")[0]


def _status(tmp_path, guest, dist):
    result = toa("status", *_args(tmp_path, guest), "--dist", str(dist), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json_items(result, "status")[0]


def _engine_facts(guest):
    """What the guest runs: toa.ko loaded?, BPF pins?, the unit's state, which boot files exist."""
    paths = [f.path for f in render.bpf_files()] + [
        f.path for f in render.autoload_files(targets.get("debian-12"), guest.release, init="systemd")]
    out = guest.run(
        "test -d /sys/module/toa && echo module || echo no-module; "
        "test -d /sys/fs/bpf/toa && echo pinned || echo not-pinned; "
        "systemctl is-active toa-bpf.service || true; "
        + "".join(f"test -e {path} -o -L {path} && echo yes || echo no; " for path in paths))
    lines = out.split()
    return {"module": lines[0] == "module", "bpf": lines[1] == "pinned", "unit": lines[2],
            "files": dict(zip(paths, (line == "yes" for line in lines[3:])))}


def _peer_proves_rewriting(guest, peer):
    """The lab's basic checks, run in the guest over SSH (a service's cgroup, not the root): every
    TOA case rewritten, every malformed one left alone, the counters read through toa-bpf."""
    with guest.connect() as conn:
        conn.put(str(peer), "/root/toa_peer")
    out = guest.run(f"chmod 755 /root/toa_peer; TOA_ENGINE_CTL={render.BPF_LOADER} /root/toa_peer basic; true")
    cases = [line for line in out.splitlines() if line.startswith(CASE_PREFIX)]
    failed = [line for line in cases if " PASS" not in line]
    assert len(cases) >= 30 and not failed, out[-3000:]
    assert "CASE v4 PASS" in out and "CASE basic PASS" in out, cases[:5]


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_auto_picks_bpf_and_a_reboot_attaches_it_again_before_sshd(bpf_fleet, bpf_dist, peer, tmp_path):
    guest = bpf_fleet[0]
    result, row = _deploy(tmp_path, guest, "--engine", "auto", "--dist", str(bpf_dist), "--dry-run")
    assert result.returncode == 0 and row["engine"] == "bpf" and row["action"] == "would-install", row
    assert "attach the eBPF engine" in row["changes"] and "auto: kernel 5.10+" in row["detail"], row
    assert _engine_facts(guest)["unit"] != "active" and not _engine_facts(guest)["bpf"]

    result, row = _deploy(tmp_path, guest, "--engine", "auto", "--dist", str(bpf_dist))
    assert result.returncode == 0 and (row["engine"], row["action"]) == ("bpf", "installed"), row
    facts = _engine_facts(guest)
    assert (facts["module"], facts["bpf"], facts["unit"]) == (False, True, "active"), facts
    assert facts["files"][render.BPF_UNIT] and facts["files"][render.BPF_WANTS_LINK]
    status = guest.run(f"{render.BPF_LOADER} status")
    assert "attached yes" in status and f"object_sha256 {engine_bpf.BpfBuild.from_dir(bpf_dist / 'bpf').object_sha256}" in status
    _peer_proves_rewriting(guest, peer)

    again, row = _deploy(tmp_path, guest, "--engine", "bpf", "--dist", str(bpf_dist))
    assert again.returncode == 0 and row["action"] == "unchanged" and row["changes"] == [], row
    shown = _status(tmp_path, guest, bpf_dist)
    assert (shown["engine"], shown["counters"], shown["autoload"]) == ("bpf", f"{render.BPF_LOADER} stats",
                                                                       "complete"), shown

    guest.reboot()
    facts = _engine_facts(guest)
    assert (facts["module"], facts["bpf"], facts["unit"]) == (False, True, "active"), facts
    # attached by the unit in this boot, before sshd started, and it said nothing on stderr
    shown = guest.run("systemctl show -p ExecMainStatus -p ExecMainExitTimestampMonotonic toa-bpf.service; "
                      "systemctl show -p ExecMainStartTimestampMonotonic ssh")
    values = dict(line.split("=", 1) for line in shown.split())
    assert values["ExecMainStatus"] == "0", shown
    assert 0 < int(values["ExecMainExitTimestampMonotonic"]) < int(values["ExecMainStartTimestampMonotonic"]), shown
    assert "attached to the cgroup2 root" in guest.run("journalctl -b -u toa-bpf.service -o cat --no-pager")
    _peer_proves_rewriting(guest, peer)

    # new options: set on the running engine, and in the unit for the next boot
    result, row = _deploy(tmp_path, guest, "--engine", "bpf", "--dist", str(bpf_dist), "--option", "kinds=254,200")
    assert result.returncode == 0 and row["action"] == "updated", row
    assert row["changes"] == [f"write {render.BPF_UNIT}", "set the eBPF engine's options"], row
    assert guest.run(f"{render.BPF_LOADER} get kinds").strip() == "254,200"
    assert "attach kinds=254,200" in guest.run(f"cat {render.BPF_UNIT}")
    # stop detaches: the unit is the engine's handle
    guest.run("systemctl stop toa-bpf.service")
    assert not _engine_facts(guest)["bpf"]
    guest.run("systemctl start toa-bpf.service")
    assert _engine_facts(guest)["bpf"]


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.ssh
@pytest.mark.network
def test_switching_engines_leaves_exactly_one_and_a_refused_engine_is_rolled_back(
        bpf_fleet, bpf_dist, refused_dist, peer, tmp_path):
    from toa import build

    guest = bpf_fleet[1]  # bullseye's 5.10: the oldest kernel the engine supports
    dist = bpf_dist
    if artifacts.find(dist, guest.release) is None:
        build.build_kernel(kernel=guest.release, out_dir=dist)
    result, row = _deploy(tmp_path, guest, "--engine", "module", "--dist", str(dist))
    assert result.returncode == 0 and row["engine"] == "module", row
    module_facts = _engine_facts(guest)
    assert (module_facts["module"], module_facts["bpf"]) == (True, False), module_facts
    assert _status(tmp_path, guest, dist)["engine"] == "module"

    # module -> bpf: toa.ko unloaded and its boot files gone, the engine attached
    result, row = _deploy(tmp_path, guest, "--engine", "bpf", "--dist", str(dist))
    assert result.returncode == 0 and (row["engine"], row["action"]) == ("bpf", "updated"), row
    assert "unload toa.ko" in row["changes"] and "remove /etc/modules-load.d/toa.conf" in row["changes"], row
    facts = _engine_facts(guest)
    assert (facts["module"], facts["bpf"], facts["unit"]) == (False, True, "active"), facts
    assert not facts["files"]["/etc/modules-load.d/toa.conf"] and not facts["files"]["/etc/kernel/postinst.d/zz-toa"]
    _peer_proves_rewriting(guest, peer)
    bpf_facts = facts

    # an engine this kernel refuses: the unit fails with the loader's line, the host is rolled back
    result, row = _deploy(tmp_path, guest, "--engine", "bpf", "--dist", str(refused_dist))
    assert result.returncode == 1 and row["action"] == "failed", row
    assert "did not attach" in row["detail"] and "rolled back" in row["detail"], row
    assert "toa-bpf: error: the kernel refused the BPF object" in row["detail"], row  # from the unit's journal
    assert _engine_facts(guest) == bpf_facts
    assert guest.run(f"sha256sum < {render.BPF_LOADER}").split()[0] == engine_bpf.sha256(dist / "bpf" / "toa-bpf")

    # bpf -> module: detached, its unit gone, toa.ko loaded and loaded at boot again
    result, row = _deploy(tmp_path, guest, "--engine", "module", "--dist", str(dist))
    assert result.returncode == 0 and row["engine"] == "module", row
    assert "detach the eBPF engine" in row["changes"] and f"remove {render.BPF_UNIT}" in row["changes"], row
    assert _engine_facts(guest) == module_facts

    # module -> a refused engine: rolled back to the module, loaded, with its boot files
    result, row = _deploy(tmp_path, guest, "--engine", "bpf", "--dist", str(refused_dist))
    assert result.returncode == 1 and "rolled back" in row["detail"], row
    assert _engine_facts(guest) == module_facts
