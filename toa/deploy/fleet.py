"""The fleet: one host's deploy (deploy_host: facts, engine, plan, apply or the eBPF engine's deploy,
rollback on failure), the hosts in parallel and in batches (run_fleet, deploy), and status.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from toa import artifacts, detect, render
from toa.deploy.apply import ApplyFailed, _Done, _rollback, apply_script, outcome_error, parse_apply, run_apply
from toa.deploy.bpf import _deploy_bpf
from toa.deploy.builds import _artifact_for, _preflight, dist_symbols
from toa.deploy.facts import ModuleState
from toa.deploy.host import DeployOptions, Host, HostResult, _describe_failure
from toa.deploy.plan import (
    BPF_MIN_KERNEL, OtherKernel, choose_engine, kernel_version, make_plan, other_kernels, wanted_parameters,
    wanted_text)
from toa.errors import ToaError
from toa.nodes import Node
from toa.render import AutoloadFile

Progress = Callable[[str, str], None]  # (host, step)


# ---------------------------------------------------------------- one host


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
                say("send")  # the upload on its way and the apply starting, until its first step
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
