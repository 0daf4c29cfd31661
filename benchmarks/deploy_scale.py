#!/usr/bin/env python3
"""What a deploy costs the control host per host, measured on a loopback fleet of N containers.

Each fleet host is a Docker container of the guest fleet's own debootstrap'd Debian userland
(toa.guests.userland: sshd, sh, coreutils; no registry) with its sshd on 127.0.0.1:<port> (host
network, so no port proxy sits between toa and sshd), an installed kernel of the newest Debian release
of --suite (its /boot/config and symvers, so toa's preflight reads a real kernel's CRCs) and a fake
kernel surface in place of kmod: modprobe, insmod, rmmod, depmod, modinfo and dmesg are one shell
script that records a load in /sys/module/<name> (a tmpfs the container is given: the real sysfs is
read-only there) and its "kernel log" in /dev/kmsg (a plain file in the container's own /dev), after
checking the file's vermagic against the fake `uname -r`. The containers run unprivileged without
CAP_SYS_MODULE and have no kmod binary: nothing they do can load a module into this machine's kernel.

For each N in --hosts (default 50, 200), N fresh containers are started, then one worker process
runs the real `toa.deploy.fleet.deploy(...)` in-process against them, host keys checked against a
known_hosts file, with the command's own live progress view drawing into /dev/null as on a terminal.
The worker reports its CPU time (user + system, every thread) and peak RSS for the deploy alone, and
separately for importing toa. Every host is then checked from outside toa (docker exec): the
installed toa.ko's sha256 must be the artifact's, /sys/module/toa/srcversion its srcversion and
/etc/modules must name toa, or the run fails: a tool that did nothing cannot look cheap. The slope
between the smallest and largest N is toa's cost per added host; 10,000 hosts are extrapolated from
it (an estimate, printed as one).

    python benchmarks/deploy_scale.py [--hosts 50,200] [--parallel P] [--profile]

--profile runs cProfile over the deploy to the smallest N and prints where the CPU went.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import resource
import secrets
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (a sibling file, found when run as a script or loaded by the tests)

# the toa of this source tree is the one measured, whatever an installed one says
sys.path.insert(0, str(results.REPO))

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SUITE = "bookworm"
DEFAULT_COUNTS = (50, 200)
ESTIMATE_HOSTS = 10_000
# The userland is bookworm's: detection calls every fleet host Debian 12.
FLEET_TARGET = "debian-12"
IMAGE_REPOSITORY = "toa-fleet"
LABEL = "org.toa.fleet"  # every fleet container carries it, valued with its run's id
FAKE_DIR = "/usr/lib/toa-fleet"
# Replaced by FAKE_KMOD (kmod's names and dmesg) or by the uname wrapper; kmod itself is left out.
KMOD_NAMES = ("modprobe", "insmod", "rmmod", "depmod", "modinfo", "lsmod")
GOAL_CPU_PER_HOST = 0.05  # seconds of toa's own CPU per added host at the largest N (issue 20)
START_WORKERS = 4  # containers started at once
SSH_READY_SECONDS = 120.0
WORKER_TIMEOUT = 3600.0

FAKE_KMOD = r"""#!/bin/sh
# toa's scale fleet: kmod and dmesg as an unprivileged container can have them. A load is recorded in
# /sys/module/<name> (a tmpfs given to the container) and the kernel log is /dev/kmsg (a plain file in
# the container's own /dev): nothing here reaches the kernel of the machine running the container.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
release=$(uname -r)
log() { printf '%s\n' "$*" >> /dev/kmsg; }
field() { tr '\000' '\n' < "$2" | sed -n "s/^$1=//p" | head -n 1; }  # a .modinfo field of module file $2
resolve() {  # a module name (or file) to its file, through modules.dep as modprobe finds it
    case $1 in */*) printf '%s\n' "$1"; return;; esac
    entry=$(grep -E "(^|/)$1\.ko(\.[a-z]+)?:" "/lib/modules/$release/modules.dep" 2>/dev/null | head -n 1 | cut -d: -f1)
    [ -n "$entry" ] && printf '%s\n' "/lib/modules/$release/$entry"
}
load() {  # FILE [name=value ...]
    file=$1; shift
    if [ ! -f "$file" ]; then echo "insmod: ERROR: could not load module $file: No such file or directory" >&2; exit 1; fi
    name=$(field name "$file")
    case "$(field vermagic "$file")" in
        "$release "*) ;;
        *) log "$name: version magic '$(field vermagic "$file")' should be '$release'"
           echo "insmod: ERROR: could not insert module $file: Invalid module format" >&2; exit 1;;
    esac
    if [ -z "$name" ] || [ -d "/sys/module/$name" ]; then
        echo "insmod: ERROR: could not insert module $file: File exists" >&2; exit 1
    fi
    mkdir -p "/sys/module/$name/parameters"
    field srcversion "$file" > "/sys/module/$name/srcversion"
    if [ "$name" = toa ]; then echo 254,253 > /sys/module/toa/parameters/kinds; echo > /sys/module/toa/parameters/trusted; fi
    for argument; do printf '%s\n' "${argument#*=}" > "/sys/module/$name/parameters/${argument%%=*}"; done
    if [ "$name" = toa ]; then log "TOA: toa loaded"; fi
}
case ${0##*/} in
modprobe)
    if [ "$1" = -r ]; then shift; exec rmmod "$@"; fi
    name=$1; shift
    [ -d "/sys/module/$name" ] && exit 0
    file=$(resolve "$name")
    if [ -z "$file" ]; then echo "modprobe: FATAL: Module $name not found in directory /lib/modules/$release" >&2; exit 1; fi
    options=$(cat /etc/modprobe.d/*.conf 2>/dev/null | sed -n "s/^options $name //p")
    load "$file" $options "$@";;
insmod) load "$@";;
rmmod)
    if [ ! -d "/sys/module/$1" ]; then echo "rmmod: ERROR: Module $1 is not currently loaded" >&2; exit 1; fi
    rm -rf "/sys/module/$1"; [ "$1" = toa ] && log "TOA: toa unloaded"; exit 0;;
depmod)
    for word; do case $word in -*) ;; *) release=$word;; esac; done
    directory=/lib/modules/$release
    [ -d "$directory" ] || { echo "depmod: ERROR: could not open directory $directory" >&2; exit 1; }
    (cd "$directory" && find . \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) \
        | sed 's|^\./||; s|$|:|' | sort) > "$directory/modules.dep.new" && mv "$directory/modules.dep.new" "$directory/modules.dep";;
modinfo)
    if [ "$1" = -F ]; then wanted=$2; shift 2; else wanted=; fi
    file=$(resolve "$1")
    [ -n "$file" ] && [ -f "$file" ] || { echo "modinfo: ERROR: Module $1 not found." >&2; exit 1; }
    if [ -n "$wanted" ]; then field "$wanted" "$file"; else tr '\000' '\n' < "$file" | grep -E '^[a-z_]+=' ; fi;;
lsmod) echo "Module                  Size  Used by"; for m in /sys/module/*/srcversion; do [ -f "$m" ] && basename "$(dirname "$m")"; done;;
dmesg) if [ "$1" = -C ] || [ "$1" = -c ]; then : > /dev/kmsg; else cat /dev/kmsg 2>/dev/null; fi;;
*) echo "toa-fleet: no fake for ${0##*/}" >&2; exit 1;;
esac
"""

UNAME = f"""#!/bin/sh
# The fleet host's kernel release is the one its /lib/modules and /boot hold, not this machine's.
if [ "$*" = -r ]; then cat {FAKE_DIR}/release; else exec {FAKE_DIR}/uname.real "$@"; fi
"""

INIT = """#!/bin/sh
# PID 1 of a fleet host: sshd on 127.0.0.1:$1 (host network), keys only, no PAM (no login session in a container).
mkdir -p /run/sshd
: > /dev/kmsg
exec /usr/sbin/sshd -D -e -o "ListenAddress=127.0.0.1:$1" -o UsePAM=no
"""

CHECK_COMMAND = ("echo \"@@installed $(sha256sum < {module} 2>/dev/null | cut -d' ' -f1)\"; "
                 "echo \"@@loaded $(cat /sys/module/toa/srcversion 2>/dev/null)\"; "
                 "echo \"@@autoload $(grep -cx toa /etc/modules 2>/dev/null)\"")


# ---------------------------------------------------------------- the fleet image


def image_tag(release: str, userland_root: Path) -> str:
    """toa-fleet:<release>-<digest of the fakes and the userland's cache entry (named by its recipe)>: a
    changed recipe is another image."""
    import hashlib

    recipe = hashlib.sha256((FAKE_KMOD + UNAME + INIT + release + str(userland_root)).encode()).hexdigest()[:12]
    return f"{IMAGE_REPOSITORY}:{release.replace('+', '_')}-{recipe}"


def _member(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(f"./{name.lstrip('/')}")
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _directory(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(f"./{name.lstrip('/')}")
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
    tar.addfile(info)


def _symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(f"./{name.lstrip('/')}")
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, int(time.time())
    tar.addfile(info)


def fleet_image(client, userland, tree, say) -> str:
    """The fleet host image for TREE's kernel, imported once from the cached guest USERLAND."""
    import docker.errors

    tag = image_tag(tree.release, userland.root)
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(tag)
        return tag
    replaced = {f"./usr/sbin/{name}" for name in KMOD_NAMES} | {"./usr/bin/kmod", "./bin/kmod", "./usr/bin/dmesg",
                                                                 "./usr/bin/uname"}
    release = tree.release
    with tempfile.TemporaryDirectory(prefix="toa-fleet-image-") as scratch:
        archive = Path(scratch) / "root.tar"
        say(f"packing the fleet host image {tag}")
        with tarfile.open(archive, "w") as tar:
            tar.add(userland.root, arcname=".", filter=lambda info: None if info.name in replaced else info)
            _directory(tar, FAKE_DIR)
            tar.add(userland.root / "usr/bin/uname", arcname=f".{FAKE_DIR}/uname.real")
            _member(tar, f"{FAKE_DIR}/fake-kmod", FAKE_KMOD.encode(), 0o755)
            _member(tar, f"{FAKE_DIR}/init", INIT.encode(), 0o755)
            _member(tar, f"{FAKE_DIR}/release", f"{release}\n".encode())
            _member(tar, "/usr/bin/uname", UNAME.encode(), 0o755)
            for name in KMOD_NAMES:
                _symlink(tar, f"/usr/sbin/{name}", f"{FAKE_DIR}/fake-kmod")
            _symlink(tar, "/usr/bin/dmesg", f"{FAKE_DIR}/fake-kmod")
            # an installed kernel as detection and the preflight see one: its modules directory and /boot files
            for directory in ("/lib/modules", f"/lib/modules/{release}", f"/lib/modules/{release}/kernel"):
                _directory(tar, directory)
            _member(tar, f"/lib/modules/{release}/modules.order", b"")
            _member(tar, f"/lib/modules/{release}/modules.dep", b"")
            _member(tar, f"/boot/vmlinuz-{release}", b"")
            _member(tar, f"/boot/config-{release}", (tree.headers_dir / ".config").read_bytes())
            _member(tar, f"/boot/symvers-{release}.gz",
                    gzip.compress((tree.headers_dir / "Module.symvers").read_bytes(), mtime=0))
        say(f"importing {tag}")
        repository, image = tag.split(":")
        client.api.import_image_from_file(str(archive), repository=repository, tag=image)
    return tag


# ---------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Fleet:
    run_id: str  # the value of LABEL on its containers
    ports: list[int]
    containers: list  # docker Container objects, in the order of ports
    key: Path
    known_hosts: Path
    nodes: Path


def _host_key_pair(private_path: Path) -> str:
    """An ed25519 host key for one fleet (PATH, PATH.pub); returns the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    private_path.chmod(0o600)  # sshd refuses a host key others can read
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    private_path.with_name(private_path.name + ".pub").write_text(public + "\n")
    return public


def _start(client, image: str, run_id: str, port: int, host_key: Path):
    # the run's own host key: the known_hosts check then proves toa reached this container and not
    # another sshd on the same loopback port (a QEMU guest of the same userland carries its key)
    keys = {str(host_key): {"bind": "/etc/ssh/ssh_host_ed25519_key", "mode": "ro"},
            f"{host_key}.pub": {"bind": "/etc/ssh/ssh_host_ed25519_key.pub", "mode": "ro"}}
    return client.containers.run(
        image, [f"{FAKE_DIR}/init", str(port)], detach=True, network_mode="host", labels={LABEL: run_id},
        volumes=keys,
        tmpfs={"/sys/module": "size=1m"},  # the fake kernel's module list; sysfs itself is read-only here
        cap_drop=["SYS_MODULE"],  # never granted to an unprivileged container; said here for the reader
        pids_limit=256, name=f"toa-fleet-{run_id}-{port}")


def remove_fleet(client, run_id: str) -> None:
    """Remove every container of the run RUN_ID (started or half-started)."""
    import docker.errors

    for container in client.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"}):
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


def _ssh_ready(port: int, deadline: float) -> None:
    import socket

    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            if conn.recv(64).startswith(b"SSH-2.0-"):
                return
        time.sleep(0.2)
    raise results.StepFailed(f"the fleet host on port {port} sent no SSH banner within {SSH_READY_SECONDS:g} s")


@contextlib.contextmanager
def fleet(client, image: str, count: int, userland, workdir: Path, say) -> Iterator[Fleet]:
    """COUNT fleet hosts answering SSH, their nodes and known_hosts files; all removed on exit."""
    from toa import guests

    run_id = secrets.token_hex(4)
    ports: list[int] = []
    try:
        say(f"starting {count} fleet host(s)")
        ports = sorted({guests.free_port() for _ in range(count * 2)})[:count]  # distinct, nothing listening
        if len(ports) < count:
            raise results.StepFailed(f"found only {len(ports)} free loopback ports for {count} hosts")
        host_key = workdir / f"host_key-{run_id}"
        public = _host_key_pair(host_key)
        with ThreadPoolExecutor(max_workers=START_WORKERS) as pool:
            containers = list(pool.map(lambda port: _start(client, image, run_id, port, host_key), ports))
        deadline = time.monotonic() + SSH_READY_SECONDS
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda port: _ssh_ready(port, deadline), ports))
        for container, port in zip(containers, ports):
            container.reload()
            if container.status != "running":  # its sshd could not listen: something else took the port
                raise results.StepFailed(f"the fleet host for port {port} stopped ({container.status}): another "
                                         "process took the port; run again")
        known_hosts = workdir / f"known_hosts-{count}"
        known_hosts.write_text("".join(f"[127.0.0.1]:{port} {public}\n" for port in ports))
        nodes = workdir / f"nodes-{count}.txt"
        nodes.write_text("".join(f"root@127.0.0.1:{port}\n" for port in ports))
        yield Fleet(run_id, ports, containers, userland.client_key, known_hosts, nodes)
    finally:
        say(f"removing {count} fleet host(s)")
        remove_fleet(client, run_id)


def check_problems(output: str, sha256: str, srcversion: str) -> list[str]:
    """What is missing on a host after the deploy (empty when the work is all there). Pure."""
    found = dict((line.partition(" ")[0], line.partition(" ")[2].strip()) for line in output.splitlines())
    problems = []
    if found.get("@@installed") != sha256:
        problems.append("the installed toa.ko is not the artifact")
    if found.get("@@loaded") != srcversion:
        problems.append(f"loaded srcversion {found.get('@@loaded') or 'none'}, not {srcversion}")
    if found.get("@@autoload", "0") in ("", "0"):
        problems.append("no toa line in /etc/modules")
    return problems


def verify_fleet(hosts: Fleet, module_file: str, sha256: str, srcversion: str) -> None:
    """Check every host from outside toa (docker exec); a host without the whole work fails the run."""
    command = ["sh", "-c", CHECK_COMMAND.format(module=shlex.quote(module_file))]

    def one(container) -> list[str]:
        result = container.exec_run(command)
        return [f"{container.name}: {problem}"
                for problem in check_problems(result.output.decode(errors="replace"), sha256, srcversion)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [problem for found in pool.map(one, hosts.containers) for problem in found]
    if problems:
        raise results.StepFailed(f"{len(problems)} problem(s) after the deploy: {'; '.join(problems[:4])}")


# ---------------------------------------------------------------- the worker: toa in-process


def _cpu_seconds() -> float:
    """This process's user + system time, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would carry over the parent's from
    before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise results.StepFailed("no VmHWM in /proc/self/status: peak memory cannot be measured here")


def worker(args: argparse.Namespace) -> int:
    """Deploy to the hosts of --nodes in this process and print what it cost as JSON."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    from rich.console import Console

    from toa import nodes, remote
    from toa.deploy.fleet import deploy
    from toa.deploy.host import DeployOptions
    from toa.commands.deploy import live_progress

    imported = {"cpu_seconds": _cpu_seconds() - cpu, "wall_seconds": time.perf_counter() - wall,
                "peak_rss_mib": _peak_rss_mib()}
    node_list = nodes.load(args.nodes)
    options = DeployOptions(dist=args.dist, ssh=remote.SshOptions(
        key_filename=str(args.key), known_hosts=str(args.known_hosts)))
    profilers = []
    if args.profile:
        import cProfile
        import threading

        def profile_thread(*_ignored):
            # the deploy's work runs in pool threads: each gets a profiler of its own from its first call
            sys.setprofile(None)
            profiler = cProfile.Profile(time.thread_time)  # CPU, not waits
            profilers.append(profiler)
            profiler.enable()

        main_profiler = cProfile.Profile(time.thread_time)  # CPU, not waits
        profilers.append(main_profiler)
    # the command's own live view, drawn as on a terminal, into nothing
    with open(os.devnull, "w") as sink:
        console = Console(file=sink, force_terminal=True, width=120)
        cpu, wall = _cpu_seconds(), time.perf_counter()
        if profilers:
            threading.setprofile(profile_thread)
            main_profiler.enable()
        with live_progress(node_list, console=console) as progress:
            outcome = deploy(node_list, options, parallel=args.parallel, progress=progress)
        if profilers:
            main_profiler.disable()
            threading.setprofile(None)
        spent = {"cpu_seconds": _cpu_seconds() - cpu, "wall_seconds": time.perf_counter() - wall,
                 "peak_rss_mib": _peak_rss_mib()}
    if profilers:
        import pstats

        stats = pstats.Stats(profilers[0])
        for profiler in profilers[1:]:
            stats.add(profiler)
        stats.dump_stats(str(args.profile))
    print(json.dumps({"import": imported, "deploy": spent,
                      "actions": [result.action for result in outcome],
                      "details": [result.detail for result in outcome if result.action != "installed"][:4]}))
    return 0


def run_worker(hosts: Fleet, dist: Path, parallel: int, profile: Path | None) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "worker", "--nodes", str(hosts.nodes), "--dist", str(dist),
            "--key", str(hosts.key), "--known-hosts", str(hosts.known_hosts), "--parallel", str(parallel)]
    if profile:
        argv += ["--profile", str(profile)]
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                   timeout=WORKER_TIMEOUT, cwd=results.REPO)
    except subprocess.TimeoutExpired:
        raise results.StepFailed(f"the deploy worker did not finish within {WORKER_TIMEOUT:g} s") from None
    try:
        outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = " | ".join((completed.stderr or completed.stdout).strip().splitlines()[-4:])
        raise results.StepFailed(f"the deploy worker failed (exit {completed.returncode}): {tail[-600:]}") from None
    if outcome["actions"] != ["installed"] * len(hosts.ports):
        failed = sum(action != "installed" for action in outcome["actions"])
        raise results.StepFailed(f"the deploy left {failed} of {len(hosts.ports)} host(s) not installed: "
                                 f"{'; '.join(outcome['details'])}")
    return outcome


# ---------------------------------------------------------------- numbers (pure)


def summarize(points: list[dict], estimate_hosts: int = ESTIMATE_HOSTS) -> dict:
    """The cost per added host between the smallest and the largest N, and the extrapolation to
    ESTIMATE_HOSTS hosts from that slope. Pure."""
    points = sorted(points, key=lambda point: point["hosts"])
    low, high = points[0], points[-1]
    added = high["hosts"] - low["hosts"]
    if added <= 0:
        return {"between": [low["hosts"], high["hosts"]], "cpu_per_host": None, "rss_mib_per_host": None,
                "wall_per_host": None, "estimate": None}
    cpu = (high["cpu_seconds"] - low["cpu_seconds"]) / added
    rss = (high["peak_rss_mib"] - low["peak_rss_mib"]) / added
    wall = (high["wall_seconds"] - low["wall_seconds"]) / added
    extra = estimate_hosts - high["hosts"]
    return {"between": [low["hosts"], high["hosts"]], "cpu_per_host": cpu, "rss_mib_per_host": rss,
            "wall_per_host": wall,
            "estimate": {"hosts": estimate_hosts, "cpu_seconds": high["cpu_seconds"] + cpu * extra,
                         "peak_rss_mib": high["peak_rss_mib"] + max(rss, 0.0) * extra,
                         "wall_seconds": high["wall_seconds"] + wall * extra}}


def goals(summary: dict) -> dict:
    cpu = summary["cpu_per_host"]
    if cpu is None:
        return {}
    return {"cpu per added host": {"goal": f"<= {GOAL_CPU_PER_HOST} s", "measured": cpu,
                                   "met": cpu <= GOAL_CPU_PER_HOST}}


def top_functions(profile: Path, count: int = 20) -> dict[str, list[dict]]:
    """A cProfile dump's functions with the most CPU of their own ("own") and with the most including
    what they call ("cumulative"), COUNT of each."""
    import pstats

    rows = []
    for (filename, line, function), (_calls, total_calls, own, cumulative, _callers) in pstats.Stats(
            str(profile)).stats.items():
        where = filename if filename.startswith("~") else "/".join(Path(filename).parts[-2:])
        rows.append({"function": f"{where}:{line}({function})", "calls": total_calls,
                     "own_seconds": round(own, 4), "cumulative_seconds": round(cumulative, 4)})
    return {"own": sorted(rows, key=lambda row: -row["own_seconds"])[:count],
            "cumulative": sorted(rows, key=lambda row: -row["cumulative_seconds"])[:count]}


# ---------------------------------------------------------------- the command


def parse_counts(text: str) -> list[int]:
    words = text.split(",")
    if not all(word.isdigit() and 1 <= int(word) <= 1000 for word in words):
        raise argparse.ArgumentTypeError(f"expected host counts from 1 to 1000 separated by commas, not {text!r}")
    return sorted({int(word) for word in words})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure toa's own CPU and memory per host on a loopback fleet.")
    sub = parser.add_subparsers(dest="mode")
    inner = sub.add_parser("worker", help="(internal) deploy in this process and print its cost as JSON")
    inner.add_argument("--nodes", type=Path, required=True)
    inner.add_argument("--dist", type=Path, required=True)
    inner.add_argument("--key", type=Path, required=True)
    inner.add_argument("--known-hosts", type=Path, required=True)
    inner.add_argument("--parallel", type=results.positive, required=True)
    inner.add_argument("--profile", type=Path)
    results.add_kernel_choice(parser, DEFAULT_SUITE)
    parser.add_argument("--hosts", type=parse_counts, default=list(DEFAULT_COUNTS),
                        help="numbers of fleet hosts, e.g. 50,200: a fresh fleet of each (default: 50,200)")
    parser.add_argument("--parallel", type=results.positive,
                        help="hosts deployed at the same time (default: toa deploy's own default)")
    parser.add_argument("--profile", action="store_true",
                        help="also run cProfile over the deploy to the smallest N and report the top functions")
    parser.add_argument("--profile-dump", type=Path,
                        help="with --profile: also keep cProfile's own dump (pstats) in this file")
    parser.add_argument("--dist", type=Path, default=Path("dist"),
                        help="where toa.ko for the kernel is, or is built: <dist>/<target>/<release>/ (default: dist)")
    parser.add_argument("--json", type=Path, help="where to write the results "
                                                 "(default: benchmarks/results/deploy_scale.json)")
    return parser.parse_args(argv)


def artifact_for(release: str, dist: Path, say):
    from toa import artifacts, build
    from toa.errors import ToaError

    artifact = artifacts.find(dist, release, FLEET_TARGET)
    if artifact is None:
        say(f"building toa.ko for {release}")
        build.build_kernel(kernel=release, out_dir=dist, distro=FLEET_TARGET, progress=say)
        artifact = artifacts.find(dist, release, FLEET_TARGET)
    if artifact is None:
        raise ToaError(f"no toa.ko for {release} in {dist} after building it: check its build.log")
    return artifact


def measure(args: argparse.Namespace, say) -> dict:
    from toa import build, guests, render, targets
    from toa.commands.deploy import DEFAULT_PARALLEL

    parallel = args.parallel or DEFAULT_PARALLEL
    _pkgs, tree = results.prepare_kernel(args, say)
    artifact = artifact_for(tree.release, args.dist, say)
    module_file = render.module_path(targets.get(FLEET_TARGET), tree.release)
    client = build.docker_client()
    userland = guests.userland(guests.DEFAULT_SUITE, progress=say)
    image = fleet_image(client, userland, tree, say)
    points, profile = [], None
    with tempfile.TemporaryDirectory(prefix="toa-deploy-scale-") as workdir_name:
        workdir = Path(workdir_name)
        for count in args.hosts:
            with fleet(client, image, count, userland, workdir, say) as hosts:
                say(f"deploying to {count} fleet host(s), {parallel} at a time")
                outcome = run_worker(hosts, args.dist.resolve(), parallel, None)
                say(f"checking {count} fleet host(s)")
                verify_fleet(hosts, module_file, artifact.sha256, artifact.srcversion)
                points.append({"hosts": count, **outcome["deploy"], "import": outcome["import"]})
        if args.profile:  # a run of its own: the profiler's overhead stays out of the points above
            count = args.hosts[0]
            with fleet(client, image, count, userland, workdir, say) as hosts:
                say(f"profiling a deploy to {count} fleet host(s)")
                profile_path = args.profile_dump or workdir / "deploy.prof"
                outcome = run_worker(hosts, args.dist.resolve(), parallel, profile_path)
                verify_fleet(hosts, module_file, artifact.sha256, artifact.srcversion)
                profile = {"hosts": count, "cpu_seconds": outcome["deploy"]["cpu_seconds"],
                           "top": top_functions(profile_path)}
    summary = summarize(points)
    return {"kernel": tree.release, "userland": guests.DEFAULT_SUITE, "parallel": parallel, "image": image,
            "artifact": {"sha256": artifact.sha256, "srcversion": artifact.srcversion},
            "points": points, "summary": summary, "goals": goals(summary), "profile": profile}


def print_document(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = doc["summary"]
    table = Table(title=f"toa deploy on a loopback fleet (--parallel {doc['parallel']}, {doc['kernel']})",
                  title_justify="left")
    for column in ("N", "wall s", "CPU s", "CPU s/host (slope)", "peak RSS MiB", "MiB/host (slope)"):
        table.add_column(column, justify="right")
    for point in doc["points"]:
        table.add_row(str(point["hosts"]), f"{point['wall_seconds']:.1f}", f"{point['cpu_seconds']:.2f}", "", 
                      f"{point['peak_rss_mib']:.0f}", "")
    if summary["cpu_per_host"] is not None:
        low, high = summary["between"]
        estimate = summary["estimate"]
        table.add_row(f"{low}->{high}", "", "", f"{summary['cpu_per_host']:.4f}", "",
                      f"{summary['rss_mib_per_host']:.3f}")
        table.add_row(f"~{estimate['hosts']:,} (estimate)", f"~{estimate['wall_seconds']:.0f}",
                      f"~{estimate['cpu_seconds']:.0f}", "", f"~{estimate['peak_rss_mib']:.0f}", "")
    console.print(table)
    for name, goal in doc["goals"].items():
        console.print(f"goal {name}: {goal['goal']}, measured {goal['measured']:.4f} s: "
                      f"{'met' if goal['met'] else 'missed'}", highlight=False)
    if doc.get("profile"):
        for order in ("own", "cumulative"):
            console.print(f"cProfile of a deploy to {doc['profile']['hosts']} hosts, CPU s by {order} time "
                          "(own, cumulative, calls):", highlight=False)
            for row in doc["profile"]["top"][order][:12]:
                console.print(f"  {row['own_seconds']:7.2f} {row['cumulative_seconds']:7.2f} {row['calls']:8d}  "
                              f"{row['function']}", highlight=False, markup=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "worker":
        return worker(args)
    return results.run(lambda say: measure(args, say),
                       lambda measured, machine: results.record("deploy_scale", machine, measured, argv),
                       print_document, args.json)


if __name__ == "__main__":
    sys.exit(main())
