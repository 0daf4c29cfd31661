#!/usr/bin/env python3
"""`invoke deploy` against the tools operators already have, on the same guests in the same run.

One fleet of QEMU guests (a Debian userland with systemd and sshd, booting a real Debian kernel) is
booted once; for each N in --hosts (default 1, 4, 8) the first N guests receive toa.ko from:

  floor          one scp plus one ssh per host, all hosts at once (OpenSSH's own binaries): the
                 least any tool can do for copy, depmod, modprobe, kernel-log check, modules-load.d
  toa            invoke deploy --parallel N (detection, sha256 and srcversion checks, atomic install,
                 verified load, modules-load.d and modprobe.d)
  ansible        benchmarks/playbook.yml, stock ansible-playbook: forks = N, facts gathered
  ansible-tuned  the same with pipelining on and no facts (with --tuned)

Every tool uses the same user (root), private key and known_hosts file, host keys checked. Before
each run the hosts are reset (module unloaded, files removed, depmod, kernel log cleared), so every
run does the full work; after it, each host must have the artifact's sha256 installed, its
srcversion loaded and modules-load.d written, or the run fails: a tool that did nothing cannot look
fast. Wall time and the host CPU time of the tool's processes are recorded per run; the printed
ratios compare tools measured minutes apart on the same guests. The exit status is non-zero only
when a tool failed or a guest could not be reached, never because of a ratio.

    python benchmarks/deploy_vs_ansible.py [--suite bullseye | --kernel RELEASE] [--hosts 1,4,8] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (a sibling file, found when run as a script or loaded by the tests)

from toa import artifacts, build, debian, guests, remote, render, targets  # noqa: E402
from toa.deploy.apply import LOADED_MESSAGE  # noqa: E402
from toa.deploy.facts import MODULE_TEMP_PREFIX, PATH_SETTING  # noqa: E402
from toa.deploy.fleet import deploy  # noqa: E402
from toa.deploy.host import DeployOptions  # noqa: E402
from toa.errors import ToaError  # noqa: E402
from toa.nodes import Node  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
PLAYBOOK = BENCH_DIR / "playbook.yml"
# The goal figures were measured on bullseye's 5.10 kernel, before toa existed.
DEFAULT_SUITE = "bullseye"
DEFAULT_COUNTS = (1, 4, 8)
# The guests' userland is bookworm: detection calls the hosts Debian 12, whatever kernel they boot.
GUEST_TARGET = "debian-12"
TOOLS = ("floor", "toa", "ansible", "ansible-tuned")
# Measured here before toa existed (5.10 guests, TCG, 2 host cores): seconds per N.
REFERENCE = {"ansible": {1: 33.0, 4: 81.0, 8: 189.0}, "floor": {1: 2.0, 4: 4.6, 8: 10.0}}
# toa/floor: issue 20 (one round trip per phase); ansible/toa: the first deploy issue.
GOALS = {"toa/floor at N=8": 1.15, "ansible/toa at N=8": 12.0}
TOOL_TIMEOUT = 1800.0
SETTLE_TIMEOUT = 600.0
GUEST_MEMORY_MB = 384
# Under TCG on a busy machine a kernel can fail its early timer check ("IO-APIC + timer doesn't
# work") and hang in a panic: such a guest is powered off and started again, up to this many times.
BOOT_ATTEMPTS = 3
PANIC_MARK = "Kernel panic - not syncing"
# Guests started this far apart do not all run their early boot at once.
START_INTERVAL_SECONDS = 3.0


@dataclass(frozen=True)
class Run:
    tool: str
    hosts: int
    repeat: int
    wall_seconds: float
    cpu_seconds: float  # user + system time of the tool's own processes on this machine


@dataclass
class Bench:
    """The booted fleet and the files every tool reads: one key, one known_hosts, the artifact."""

    fleet: list[guests.Guest]
    artifact: artifacts.Artifact
    workdir: Path
    dist: Path

    @property
    def release(self) -> str:
        return self.artifact.release

    @property
    def key(self) -> Path:
        return self.fleet[0].key_path

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def module_file(self) -> str:
        return render.module_path(targets.get(GUEST_TARGET), self.release)


# ---------------------------------------------------------------- files each tool reads (pure)


def known_hosts_text(fleet: list[guests.Guest]) -> str:
    return "".join(guest.known_hosts.read_text() for guest in fleet)


def nodes_text(fleet: list[guests.Guest]) -> str:
    return "".join(guest.node_line() + "\n" for guest in fleet)


def ssh_options(key: Path, known_hosts: Path) -> list[str]:
    """OpenSSH options every tool shares: this key only, this known_hosts file, host keys checked."""
    return ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", f"IdentityFile={key}",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes"]


def inventory_text(fleet: list[guests.Guest], key: Path, known_hosts: Path) -> str:
    lines = ["[fleet]"]
    lines += [f"{guest.name} ansible_host={guests.LOOPBACK} ansible_port={guest.port}" for guest in fleet]
    common = " ".join(shlex.quote(word) for word in ssh_options(key, known_hosts))
    lines += ["", "[fleet:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={key}",
              f"ansible_ssh_common_args={common!r}"]  # INI values in quotes keep their spaces
    return "\n".join(lines) + "\n"


def floor_command(release: str) -> str:
    """The one ssh command per host of the floor: index, load, check the log, load at boot."""
    q = shlex.quote
    return (f"depmod -a {q(release)} && modprobe toa && dmesg | grep -q {q(LOADED_MESSAGE)} "
            "&& echo toa > /etc/modules-load.d/toa.conf")


def reset_command(release: str, module_file: str) -> str:
    """Take a host back to before any deploy: unloaded, no files (the kernel hooks' module sources
    included), indexes rebuilt, kernel log empty."""
    q = shlex.quote
    paths = [module_file, module_file + ".prev"] + [f.path for f in render.autoload_files(
        targets.get(GUEST_TARGET), release, init="systemd")]
    module_dir = shlex.quote(module_file.rsplit("/", 1)[0])
    sources = render.hook_source_dir(targets.get(GUEST_TARGET))  # the kernel hooks' module sources
    return "\n".join([
        PATH_SETTING,
        # a socket still being freed may hold the module for a moment
        "tries=0; while [ -d /sys/module/toa ] && ! rmmod toa 2>/dev/null; do "
        "tries=$((tries + 1)); [ $tries -lt 100 ] || { echo 'rmmod toa keeps failing' >&2; exit 1; }; sleep 0.1; done",
        f"rm -f {' '.join(q(path) for path in paths)} {module_dir}/{MODULE_TEMP_PREFIX}*",
        f"rm -rf /tmp/toa-deploy.* /tmp/.ansible /root/.ansible/tmp {q(sources)}",
        f"depmod -a {q(release)}",
        "dmesg -C",
        "sync",
    ]) + "\n"


def check_command(module_file: str) -> str:
    q = shlex.quote
    return (f"{PATH_SETTING}\necho \"@@loaded $(cat /sys/module/toa/srcversion 2>/dev/null)\"\n"
            f"echo \"@@installed $(sha256sum < {q(module_file)} 2>/dev/null | cut -d' ' -f1)\"\n"
            "echo \"@@autoload $(cat /etc/modules-load.d/toa.conf 2>/dev/null | grep -cx toa)\"\n")


def check_problems(output: str, artifact: artifacts.Artifact) -> list[str]:
    """What is missing on a host after a tool ran (empty when the work is all there). Pure."""
    found = {}
    for line in output.splitlines():
        tag, _, value = line.partition(" ")
        found[tag] = value.strip()
    problems = []
    if found.get("@@loaded") != artifact.srcversion:
        problems.append(f"loaded srcversion {found.get('@@loaded') or 'none'}, not {artifact.srcversion}")
    if found.get("@@installed") != artifact.sha256:
        problems.append("the installed toa.ko is not the artifact")
    if found.get("@@autoload", "0") == "0":
        problems.append("no toa line in /etc/modules-load.d/toa.conf")
    return problems


def median_by(runs: list[Run], tool: str, hosts: int, what: str) -> float | None:
    values = [getattr(run, what) for run in runs if run.tool == tool and run.hosts == hosts]
    return statistics.median(values) if values else None


def summarize(runs: list[Run], counts: list[int]) -> dict:
    """Medians per tool and N, the ratios, and each tool's cost per added host. Pure."""
    tools = [tool for tool in TOOLS if any(run.tool == tool for run in runs)]
    table = {tool: {str(n): {"wall_seconds": median_by(runs, tool, n, "wall_seconds"),
                             "cpu_seconds": median_by(runs, tool, n, "cpu_seconds")} for n in counts}
             for tool in tools}
    ratios = {}
    for n in counts:
        wall = {tool: table[tool][str(n)]["wall_seconds"] for tool in tools}
        ratios[str(n)] = {f"{a}/{b}": wall[a] / wall[b]
                          for a, b in (("toa", "floor"), ("ansible", "toa"), ("ansible-tuned", "toa"))
                          if wall.get(a) and wall.get(b)}
    per_host = {}
    low, high = min(counts), max(counts)
    if high > low:
        for tool in tools:
            per_host[tool] = {
                what: (table[tool][str(high)][what] - table[tool][str(low)][what]) / (high - low)
                for what in ("wall_seconds", "cpu_seconds")
            }
    return {"tools": tools, "median": table, "ratios": ratios, "per_added_host": per_host,
            "per_added_host_between": [low, high]}


def goals(summary: dict) -> dict:
    at8 = summary["ratios"].get("8", {})
    out = {}
    if "toa/floor" in at8:
        value = at8["toa/floor"]
        goal = GOALS["toa/floor at N=8"]
        out["toa/floor at N=8"] = {"goal": f"<= {goal}", "measured": value, "met": value <= goal}
    if "ansible/toa" in at8:
        value = at8["ansible/toa"]
        goal = GOALS["ansible/toa at N=8"]
        out["ansible/toa at N=8"] = {"goal": f">= {goal}", "measured": value, "met": value >= goal}
    return out


# ---------------------------------------------------------------- the guests


def panics(guest: guests.Guest) -> int:
    """How many times the guest's kernel panicked (the serial log keeps every boot's console)."""
    if not guest.serial_log.is_file():
        return 0
    return guest.serial_log.read_text(errors="replace").count(PANIC_MARK)


def boot_until_ssh(guest: guests.Guest, deadline: float, say) -> None:
    """Wait for the guest's sshd; start it again when its kernel panicked during boot."""
    restarted = 0
    while True:
        try:
            # one wait to the deadline: its probes stay open (a loaded guest's sshd is slow to answer),
            # and it ends early when the guest panics or stops
            guest.wait_for_ssh(max(1.0, deadline - time.monotonic()))
            say(f"{guest.name} answers SSH")
            return
        except ToaError:
            if panics(guest) > restarted and restarted + 1 < BOOT_ATTEMPTS:
                say(f"{guest.name}: the kernel panicked while booting; starting it again")
                guest.kill()
                guest.start()
                restarted += 1
            elif not guest.is_running() or time.monotonic() >= deadline:
                raise


@contextlib.contextmanager
def booted_fleet(tree: debian.KernelTree, workdir: Path, count: int, boot_timeout: float,
                 say) -> Iterator[list[guests.Guest]]:
    """COUNT guests of the kernel, started a few seconds apart, all answering SSH; killed on exit."""
    image = guests.guest_image(tree, progress=say)
    fleet = guests.new_guests([image], workdir, count=count, memory_mb=GUEST_MEMORY_MB)
    try:
        for guest in fleet:
            say(f"booting {guest.name} ({guest.release}) on port {guest.port}")
            guest.start()
            time.sleep(START_INTERVAL_SECONDS)
        deadline = time.monotonic() + boot_timeout
        on_hosts(fleet, lambda guest: boot_until_ssh(guest, deadline, say))
        yield fleet
    finally:
        for guest in fleet:
            guest.kill()


def on_hosts(fleet: list[guests.Guest], work: Callable[[guests.Guest], object]) -> list:
    with ThreadPoolExecutor(max_workers=len(fleet)) as pool:
        return list(pool.map(work, fleet))


def run_with_retries(guest: guests.Guest, command: str, attempts: int = 4) -> str:
    """A command over SSH; a loaded guest's sshd may drop a login during the banner, so retry."""
    failure = None
    for attempt in range(1, attempts + 1):
        try:
            return guest.run(f"sh -c {shlex.quote(command)}")
        except ToaError as error:
            failure = error
            if "command failed" in str(error):  # the command ran and failed: retrying cannot help
                break
            time.sleep(2.0 * attempt)
    raise results.StepFailed(f"{guest.name}: {failure}")


def settle(fleet: list[guests.Guest]) -> float:
    """Wait until systemd in every guest finished starting up; returns the seconds waited."""
    started = time.monotonic()
    # `--wait` blocks until start-up is over; a degraded system (a unit failed) is still settled.
    on_hosts(fleet, lambda guest: run_with_retries(
        guest, f"timeout {int(SETTLE_TIMEOUT)} systemctl is-system-running --wait || true"))
    return time.monotonic() - started


def reset(bench: Bench, fleet: list[guests.Guest]) -> None:
    on_hosts(fleet, lambda guest: run_with_retries(guest, reset_command(bench.release, bench.module_file)))


def verify(bench: Bench, fleet: list[guests.Guest], tool: str) -> None:
    outputs = on_hosts(fleet, lambda guest: run_with_retries(guest, check_command(bench.module_file)))
    problems = [f"{guest.name}: {problem}" for guest, output in zip(fleet, outputs)
                for problem in check_problems(output, bench.artifact)]
    if problems:
        raise results.StepFailed(f"after {tool}, {len(problems)} problem(s): {'; '.join(problems[:4])}")


# ---------------------------------------------------------------- the tools


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tail(completed: subprocess.CompletedProcess) -> str:
    return " | ".join((completed.stderr + completed.stdout).strip().splitlines()[-4:])[-600:]


def run_floor(bench: Bench, fleet: list[guests.Guest]) -> None:
    options = ssh_options(bench.key, bench.known_hosts)

    def one(guest: guests.Guest) -> str | None:
        target = f"root@{guests.LOOPBACK}"
        steps = (["scp", "-q", *options, "-P", str(guest.port), str(bench.artifact.ko),
                  f"{target}:{bench.module_file}"],
                 ["ssh", *options, "-p", str(guest.port), target, floor_command(bench.release)])
        for argv in steps:
            completed = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                       timeout=TOOL_TIMEOUT)
            if completed.returncode != 0:
                return f"{guest.name}: {argv[0]} exit {completed.returncode}: {tail(completed)}"
        return None

    failures = [failure for failure in on_hosts(fleet, one) if failure]
    if failures:
        raise results.StepFailed(f"floor: {'; '.join(failures[:3])}")


def run_toa(bench: Bench, fleet: list[guests.Guest]) -> None:
    nodes = bench.workdir / f"nodes-{len(fleet)}.txt"
    nodes.write_text(nodes_text(fleet))
    argv = [sys.executable, "-m", "invoke", "--search-root", str(results.REPO), "deploy", "--hosts", str(nodes),
            "--dist", str(bench.dist), "--parallel", str(len(fleet)), "--key", str(bench.key),
            "--known-hosts", str(bench.known_hosts), "--json"]
    completed = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT,
                               cwd=results.REPO)
    try:
        actions = [host["action"] for host in json.loads(completed.stdout)["items"]]
    except (ValueError, KeyError, TypeError):
        actions = []
    if completed.returncode != 0 or actions != ["installed"] * len(fleet):
        raise results.StepFailed(f"invoke deploy (exit {completed.returncode}, actions {actions}): {tail(completed)}")


def ansible_env(bench: Bench, tuned: bool) -> dict[str, str]:
    env = {**os.environ, "ANSIBLE_HOME": str(bench.workdir / "ansible-home"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_RETRY_FILES_ENABLED": "False"}
    if tuned:
        env.update(ANSIBLE_PIPELINING="True", ANSIBLE_GATHERING="explicit")
    return env


def run_ansible(bench: Bench, fleet: list[guests.Guest], tuned: bool) -> None:
    playbook = shutil.which("ansible-playbook")
    if playbook is None:
        raise ToaError("ansible-playbook not found: pip install ansible-core")
    inventory = bench.workdir / f"inventory-{len(fleet)}.ini"
    inventory.write_text(inventory_text(fleet, bench.key, bench.known_hosts))
    argv = [playbook, "-i", str(inventory), "-f", str(len(fleet)), str(PLAYBOOK),
            "-e", f"module_src={bench.artifact.ko.resolve()}", "-e", f"kernel_release={bench.release}"]
    completed = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT,
                               env=ansible_env(bench, tuned))
    if completed.returncode != 0:
        raise results.StepFailed(f"ansible-playbook{' (tuned)' if tuned else ''} exit {completed.returncode}: "
                                 f"{tail(completed)}")


RUNNERS = {
    "floor": run_floor,
    "toa": run_toa,
    "ansible": lambda bench, fleet: run_ansible(bench, fleet, tuned=False),
    "ansible-tuned": lambda bench, fleet: run_ansible(bench, fleet, tuned=True),
}


def timed_run(bench: Bench, tool: str, fleet: list[guests.Guest], repeat: int) -> Run:
    reset(bench, fleet)
    cpu_before, started = children_cpu(), time.perf_counter()
    RUNNERS[tool](bench, fleet)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu_before
    verify(bench, fleet, tool)
    return Run(tool, len(fleet), repeat, wall, cpu)


def profile_toa(bench: Bench, fleet: list[guests.Guest]) -> dict:
    """One more toa deploy, in this process, timing each host's steps (from deploy's progress calls):
    where toa's time goes. Returns {step: median seconds over hosts}."""
    reset(bench, fleet)
    marks: dict[str, list[tuple[float, str]]] = {}
    started = time.perf_counter()

    def progress(host: str, step: str) -> None:
        marks.setdefault(host, []).append((time.perf_counter(), step))

    nodes = [Node(remote.parse_host(guest.node_line())) for guest in fleet]
    options = DeployOptions(dist=bench.dist, ssh=remote.SshOptions(
        key_filename=str(bench.key), known_hosts=str(bench.known_hosts)))
    outcome = deploy(nodes, options, parallel=len(fleet), progress=progress)
    wall = time.perf_counter() - started
    if [result.action for result in outcome] != ["installed"] * len(fleet):
        raise results.StepFailed(f"profiled deploy: {[r.detail for r in outcome if r.action != 'installed'][:2]}")
    verify(bench, fleet, "the profiled toa deploy")
    return {"hosts": len(fleet), "wall_seconds": wall, "step_seconds": step_medians(marks)}


def step_medians(marks: dict[str, list[tuple[float, str]]]) -> dict[str, float]:
    """Median over hosts of the seconds each host spent in each step. A step lasts from its progress
    call to the next one (a step reported twice, as autoload is per file, adds up). Pure."""
    per_host: dict[str, dict[str, float]] = {}
    for host, host_marks in marks.items():
        spent = per_host.setdefault(host, {})
        for (at, step), (until, _next) in zip(host_marks, host_marks[1:]):
            spent[step] = spent.get(step, 0.0) + until - at
    steps = list(dict.fromkeys(step for spent in per_host.values() for step in spent))
    return {step: statistics.median(spent.get(step, 0.0) for spent in per_host.values()) for step in steps}


# ---------------------------------------------------------------- the command


def parse_counts(text: str) -> list[int]:
    words = text.split(",")
    if not all(word.isdigit() and 1 <= int(word) <= 16 for word in words):
        raise argparse.ArgumentTypeError(f"expected host counts from 1 to 16 separated by commas, not {text!r}")
    return sorted({int(word) for word in words})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time invoke deploy against Ansible and bare scp+ssh on QEMU guests.")
    results.add_kernel_choice(parser, DEFAULT_SUITE)
    parser.add_argument("--hosts", type=parse_counts, default=list(DEFAULT_COUNTS),
                        help="numbers of hosts to deploy to, e.g. 1,4,8: one fleet of the largest is booted "
                             "and each run uses its first N guests (default: 1,4,8)")
    parser.add_argument("--repeats", type=results.positive, default=1,
                        help="runs per tool and N; the medians are reported (default: 1)")
    parser.add_argument("--tools", default=",".join(t for t in TOOLS if t != "ansible-tuned"),
                        help=f"which of {', '.join(TOOLS)} to run (default: all but ansible-tuned)")
    parser.add_argument("--profile", action="store_true",
                        help="also time each step of one toa deploy to the largest N (where toa's time goes)")
    parser.add_argument("--dist", type=Path, default=Path("dist"),
                        help="where toa.ko for the kernel is, or is built: <dist>/<target>/<release>/ (default: dist)")
    parser.add_argument("--boot-timeout", type=results.positive, default=900,
                        help="seconds for the whole fleet to answer SSH (default: 900)")
    parser.add_argument("--json", type=Path,
                        help="where to write the results (default: benchmarks/results/deploy_vs_ansible.json)")
    args = parser.parse_args(argv)
    args.tools = [word for word in args.tools.split(",") if word]
    unknown = [word for word in args.tools if word not in TOOLS]
    if unknown or not args.tools:
        parser.error(f"--tools: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TOOLS)}")
    return args


def artifact_for(release: str, dist: Path, say) -> artifacts.Artifact:
    artifact = artifacts.find(dist, release, GUEST_TARGET)
    if artifact is None:
        say(f"building toa.ko for {release}")
        build.build_kernel(kernel=release, out_dir=dist, progress=say)
        artifact = artifacts.find(dist, release, GUEST_TARGET)
    if artifact is None:
        raise ToaError(f"no toa.ko for {release} in {dist} after building it: check its build.log")
    return artifact


def measure(args: argparse.Namespace, say) -> dict:
    _pkgs, tree = results.prepare_kernel(args, say)
    release = tree.release
    artifact = artifact_for(release, args.dist, say)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="toa-deploy-bench-") as workdir_name:
        workdir = Path(workdir_name)
        started = time.monotonic()
        with booted_fleet(tree, workdir / "guests", max(args.hosts), float(args.boot_timeout), say) as fleet:
            boot_seconds = time.monotonic() - started
            restarts = sum(panics(guest) for guest in fleet)
            say("waiting for systemd in every guest to finish starting")
            settle_seconds = settle(fleet)
            bench = Bench(fleet, artifact, workdir, args.dist.resolve())
            bench.known_hosts.write_text(known_hosts_text(fleet))
            for count in args.hosts:
                for repeat in range(1, args.repeats + 1):
                    for tool in args.tools:
                        say(f"{tool} to {count} host(s), run {repeat}/{args.repeats}")
                        runs.append(timed_run(bench, tool, fleet[:count], repeat))
            profile = None
            if args.profile:
                say(f"profiling one toa deploy to {max(args.hosts)} host(s)")
                profile = profile_toa(bench, fleet[:max(args.hosts)])
    summary = summarize(runs, args.hosts)
    return {
        "kernel": release,
        "guest_userland": guests.DEFAULT_SUITE,
        "guests": {"count": max(args.hosts), "memory_mb": GUEST_MEMORY_MB, "smp": 1, "accel": "tcg",
                   "boot_seconds": boot_seconds, "settle_seconds": settle_seconds, "boot_panics": restarts},
        "artifact": {"ko": str(artifact.ko), "sha256": artifact.sha256, "srcversion": artifact.srcversion},
        "ansible_version": ansible_version(),
        "runs": [run.__dict__ for run in runs],
        "summary": summary,
        "goals": goals(summary),
        "reference_before_toa": REFERENCE,
        "profile": profile,
    }


def ansible_version() -> str | None:
    playbook = shutil.which("ansible-playbook")
    if playbook is None:
        return None
    first = subprocess.run([playbook, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return first[0] if first else None


def miss_text(name: str, goal: dict) -> str:
    """"met", or by how much the measurement misses the goal."""
    if goal["met"]:
        return "met"
    target = GOALS[name]
    factor = goal["measured"] / target if goal["goal"].startswith("<=") else target / goal["measured"]
    return f"missed by a factor of {factor:.2f}"


def print_document(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = doc["summary"]
    counts = [int(n) for n in next(iter(summary["median"].values()))]
    table = Table(title=f"deploy toa.ko to N guests ({doc['kernel']}, TCG)", title_justify="left")
    table.add_column("tool", no_wrap=True)
    for n in counts:
        table.add_column(f"N={n} wall s", justify="right")
        table.add_column(f"N={n} cpu s", justify="right")
    for tool in summary["tools"]:
        cells = []
        for n in counts:
            cell = summary["median"][tool][str(n)]
            cells += [f"{cell['wall_seconds']:.1f}", f"{cell['cpu_seconds']:.1f}"]
        table.add_row(tool, *cells)
    console.print(table)
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    for n in counts:
        ratios = ", ".join(f"{name} = {value:.2f}"
                           for name, value in summary["ratios"][str(n)].items())
        say(f"N={n}: {ratios}")
    low, high = summary["per_added_host_between"]
    for tool, cost in summary["per_added_host"].items():
        say(f"{tool}: +{cost['wall_seconds']:.2f} s wall and +{cost['cpu_seconds']:.2f} s host CPU per added host "
            f"(N={low} to N={high})")
    for name, goal in doc["goals"].items():
        say(f"goal {name}: {goal['goal']}, measured {goal['measured']:.2f}: {miss_text(name, goal)}")
    if doc.get("profile"):
        steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in doc["profile"]["step_seconds"].items())
        say(f"toa deploy to {doc['profile']['hosts']} hosts, median seconds per step: {steps}")
    guests_info = doc["guests"]
    say(f"{guests_info['count']} guests booted in {guests_info['boot_seconds']:.0f} s and settled in "
        f"{guests_info['settle_seconds']:.0f} s more; wall = seconds until the tool exited, cpu = its processes' "
        "user+system time on this machine")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return results.run(lambda say: measure(args, say),
                       lambda measured, machine: results.record("deploy_vs_ansible", machine, measured, argv),
                       print_document, args.json)


if __name__ == "__main__":
    sys.exit(main())
