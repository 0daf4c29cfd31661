"""Tasks that roll toa.ko out to the hosts of a nodes file and show their module state."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from invoke import Exit, task

from toa.commands.common import module_options, print_json, print_table, user_errors, whole_number
from toa.errors import ToaError

# toa.deploy.host.COMMAND_TIMEOUT_SECONDS and SshOptions' timeout, here without importing paramiko (a test ties them)
COMMAND_TIMEOUT = 120
CONNECT_TIMEOUT = 15
# Hosts worked on at once unless --parallel says otherwise. Measured with benchmarks/deploy_scale.py
# (200 loopback hosts, one apply script per host, 2 cores, 2026-12-01): toa's own CPU per added host
# 0.032 s at 5 and 0.045 s at 20 (more threads contend for the interpreter), peak memory 76 and
# 121 MiB, and 20 did not finish sooner (115 s against 109 s; the hosts shared those cores). A fleet
# whose hosts answer slowly gains wall time from more: pass --parallel.
DEFAULT_PARALLEL = 5

FLEET_HELP = {
    "hosts": "nodes file: one [user@]host[:port] per line, then optional key=PATH sudo=yes|no user=NAME",
    "dist": "where the built artifacts are: <dist>/<target>/<release>/toa.ko (default: dist)",
    "parallel": f"hosts worked on at the same time (default: {DEFAULT_PARALLEL})",
    "key": "SSH private key for hosts without key= (default: ssh-agent and ~/.ssh keys)",
    "known_hosts": "extra known_hosts file to check host keys against (and to record new ones in)",
    "accept_new_host_keys": "trust hosts seen for the first time and record their keys (a changed key is "
                            "still refused); without it unknown host keys are refused",
    "json": "print JSON instead of a table",
    "option": "module option for the deploy, e.g. --option trusted=100.64.0.0/10 (the balancers' source range) or "
              "--option kinds=254,200 (repeatable; default: the module's)",
    "command_timeout": f"seconds each command or upload on a host may take; a host that hangs or vanishes fails "
                       f"after it (default: {COMMAND_TIMEOUT}; connecting waits at most {CONNECT_TIMEOUT})",
}


def _fleet_options(dist, key, known_hosts, accept_new_host_keys, option, command_timeout, build_missing=False,
                   dry_run=False, kernels="running,next", engine="module"):
    from toa import remote
    from toa.deploy import host, plan

    options = module_options(option)
    if key and not Path(key).is_file():
        raise ToaError(f"key file {key} does not exist: fix --key")
    ssh = remote.SshOptions(key_filename=key, known_hosts=known_hosts, accept_new_host_keys=accept_new_host_keys)
    chosen = tuple(word.strip() for word in str(kernels).split(","))
    if not chosen or any(word not in plan.KERNEL_CHOICES for word in chosen) or "running" not in chosen:
        raise ToaError(f"invalid --kernels {str(kernels)[:40]!r}: give running plus any of next, installed, "
                       "comma-separated (e.g. running,next)")
    if engine not in plan.ENGINES:
        raise ToaError(f"invalid --engine {str(engine)[:40]!r}: give one of {', '.join(plan.ENGINES)}")
    return host.DeployOptions(dist=Path(dist), ssh=ssh, options=options or None, build_missing=build_missing,
                              dry_run=dry_run, command_timeout=whole_number(command_timeout, "--command-timeout", 1),
                              kernels=chosen, engine=engine)



# Rows the live view shows at most for hosts in progress and for failed hosts: a fleet of 10,000
# hosts gets counts per step and these few rows, redrawn REFRESH_PER_SECOND times a second whatever its size.
LIVE_ROWS = 8
REFRESH_PER_SECOND = 2  # each redraw costs CPU for as long as the deploy runs
FINISHED_STEPS = ("done", "failed")


class FleetProgress:
    """What the live view shows, kept up to date at O(1) per progress report: how many hosts are at each
    step, the hosts in progress (oldest first) and the hosts that failed."""

    def __init__(self, names):
        self.total = len(names)
        self.steps: dict[str, str] = {}  # host -> its step, for hosts that reported one
        self.counts: dict[str, int] = {"waiting": self.total}
        self.active: dict[str, str] = {}  # hosts between their first report and done/failed, in that order
        self.failed: list[str] = []
        self.lock = threading.Lock()

    def report(self, host: str, step: str) -> None:
        with self.lock:
            before = self.steps.get(host, "waiting")
            self.steps[host] = step
            self.counts[before] -= 1
            self.counts[step] = self.counts.get(step, 0) + 1
            if step in FINISHED_STEPS:
                self.active.pop(host, None)
                if step == "failed":
                    self.failed.append(host)
            else:
                self.active[host] = step

    def view(self):
        """The bounded view: counts per step, then at most LIVE_ROWS hosts in progress and LIVE_ROWS failed.
        Plain text lines: a rich Table of the same rows took about 14 ms a redraw, these 0.5 ms."""
        from rich.text import Text

        with self.lock:
            # waiting first, then the steps in the order hosts first reached them, then done, then failed
            order = {"waiting": 0, "done": 2, "failed": 3}
            counts = sorted(((step, count) for step, count in self.counts.items() if count),
                            key=lambda item: order.get(item[0], 1))
            active = list(zip(self.active.items(), range(LIVE_ROWS)))
            more_active = len(self.active) - len(active)
            failed, more_failed = self.failed[-LIVE_ROWS:], max(0, len(self.failed) - LIVE_ROWS)
        view = Text(f"{self.total} host(s): " + ", ".join(f"{step} {count}" for step, count in counts))
        width = max((len(host) for (host, _step), _ in active), default=0)
        for (host, step), _ in active:
            view.append(f"\n  {host:<{width}}  {step}")
        if more_active:
            view.append(f"\n  ... and {more_active} more in progress")
        for host in failed:
            view.append(f"\n  {host}  ")
            view.append("failed", style="bold red")
        if more_failed:
            view.append(f"\n  ... and {more_failed} more failed", style="red")
        return view


@contextlib.contextmanager
def live_progress(nodes, console=None):
    """A live view on stderr (or CONSOLE) of the fleet's progress, bounded whatever the fleet's size
    (see FleetProgress); yields the progress callback. The full table comes once, at the end."""
    from rich.console import Console
    from rich.live import Live

    state = FleetProgress([node.name for node in nodes])
    with Live(console=console or Console(stderr=True), transient=True, refresh_per_second=REFRESH_PER_SECOND,
              get_renderable=state.view):
        yield state.report


ACTION_STYLE = {"failed": "bold red", "skipped": "yellow", "installed": "green", "updated": "green"}


@task(help={**FLEET_HELP,
            "batch": "deploy in rolling batches of this many hosts (default: 0, all at once)",
            "max_fail": "after a batch, stop starting new ones once more than this many hosts failed (default: 0)",
            "build_missing": "build toa.ko for a kernel that has none in --dist instead of failing that host",
            "kernels": "which kernels get toa.ko: running (loaded now), next (the one the next boot runs), installed "
                       "(every installed kernel); comma-separated, running always (default: running,next)",
            "dry_run": "connect and detect, then print each host's plan without changing anything",
            "engine": "module (toa.ko, default), bpf (the eBPF engine: toa-bpf and toa-bpf.service, kernels 5.10+ "
                      "with systemd; built into <dist>/bpf), or auto (bpf where the host's kernel can run it, "
                      "the module elsewhere); a host switched from one engine to the other keeps only the new one"},
      iterable=["option"], auto_shortflags=False)
@user_errors
def deploy(c, hosts=None, dist="dist", parallel=None, batch=None, max_fail=None, build_missing=False, dry_run=False,
           json=False, key=None, known_hosts=None, accept_new_host_keys=False, option=None,
           command_timeout=COMMAND_TIMEOUT, kernels="running,next", engine="module"):
    """Install, load and verify toa.ko (or attach the eBPF engine) on the hosts of a nodes file, and
    start it at every boot.

    A host that fails is rolled back to what it had; a second run changes nothing."""
    from rich.text import Text

    from toa import nodes as inventory
    from toa.deploy import fleet

    node_list = inventory.load(hosts)  # every line checked before any connection
    options = _fleet_options(dist, key, known_hosts, accept_new_host_keys, option, command_timeout, build_missing,
                             dry_run, kernels, engine)
    parallel, batch = whole_number(parallel, "--parallel", 1, DEFAULT_PARALLEL), whole_number(batch, "--batch", 0, 0)
    max_fail = whole_number(max_fail, "--max-fail", 0, 0)
    with live_progress(node_list) as progress:
        results = fleet.deploy(node_list, options, parallel=parallel, batch=batch, max_fail=max_fail,
                               progress=progress)
    failed = sum(result.action == "failed" for result in results)
    if json:
        print_json("deploy", [result.as_dict() for result in results], failed=failed, dry_run=dry_run)
    else:
        rows = [(result.host, result.kernel, result.engine,
                 Text(result.action, style=ACTION_STYLE.get(result.action, "")), result.detail) for result in results]
        print_table("toa deploy --dry-run: the plan" if dry_run else "toa deploy",
                    ("host", "kernel", "engine", "action", "detail"), rows)
        if all(result.action == "unchanged" for result in results):
            print("every host already runs the right toa: nothing changed")
    if failed:
        raise Exit(code=1)


@task(help=FLEET_HELP, iterable=["option"], auto_shortflags=False)
@user_errors
def status(c, hosts=None, dist="dist", parallel=None, json=False, key=None, known_hosts=None, accept_new_host_keys=False,
           option=None, command_timeout=COMMAND_TIMEOUT):
    """Show each host's toa state: the engine running (module, bpf or none) and where its counters are read,
    kernel, loaded build, installed file, artifact match, autoload files, and whether the kernel the next boot
    runs has toa."""
    from rich.text import Text

    from toa import nodes as inventory
    from toa.deploy import fleet

    node_list = inventory.load(hosts)
    options = _fleet_options(dist, key, known_hosts, accept_new_host_keys, option, command_timeout)
    with live_progress(node_list) as progress:
        states = fleet.status(node_list, options, parallel=whole_number(parallel, "--parallel", 1, DEFAULT_PARALLEL),
                              progress=progress)
    if json:
        print_json("status", [state.as_dict() for state in states])
    else:
        # loaded and installed show srcversions: equal to the artifact's when all is well
        print_table("toa status", ("host", "engine", "counters", "kernel", "loaded", "installed", "artifact",
                                   "autoload", "next boot", "error"),
                    [(s.host, Text(s.engine, style="bold red") if s.engine and "+" in s.engine else s.engine,
                      s.counters, s.kernel, s.loaded_srcversion or ("no" if s.loaded is False else None),
                      s.installed_srcversion, s.artifact, s.autoload,
                      Text(f"{s.next_kernel}: {s.next_boot}", style="bold red") if s.next_boot.startswith("NO")
                      else (f"{s.next_kernel}: {s.next_boot}" if s.next_kernel else None), s.error)
                     for s in states])
    if any(state.error for state in states):
        raise Exit(code=1)
