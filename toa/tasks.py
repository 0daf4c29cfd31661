"""The invoke tasks: thin entry points that parse flags, call the package and print the result.

Used by the top-level tasks.py (``invoke ...``) and by the ``toa`` console command.
"""

from pathlib import Path

from invoke import Collection, Exit, task

from toa.commands.common import SSH_HELP, print_fields, print_json, progress, ssh_connect, user_errors
from toa.errors import ToaError


ns = Collection()


@task(help={"root": "inspect a root filesystem (image or mounted disk) instead of this machine",
            "json": "print JSON instead of a table", **SSH_HELP}, auto_shortflags=False)
@user_errors
def detect(c, root=None, host=None, json=False, key=None, known_hosts=None, no_host_key_check=False):
    """Show the distro, kernel and build target of this machine, a root directory or an SSH host."""
    from toa import detect as detection

    if root and host:
        raise ToaError("give --root or --host, not both")
    if host:
        with ssh_connect(host, key, known_hosts, no_host_key_check) as conn:
            facts = detection.read_remote(conn)
        where = host
    elif root:
        facts, where = detection.read_root(root), root
    else:
        facts, where = detection.read_local(), "this machine"
    info = detection.identify(facts).as_dict()
    if json:
        print_json(info)
    else:
        print_fields(f"toa detect: {where}", info)


@task(help={"kernel": "kernel release to install headers for (default: the running kernel)", **SSH_HELP},
      auto_shortflags=False)
@user_errors
def headers(c, kernel=None, host=None, key=None, known_hosts=None, no_host_key_check=False):
    """Install the kernel headers (kernel-devel) matching the running kernel, or --kernel."""
    from toa import detect as detection
    from toa import headers as kernel_headers

    if host:
        with ssh_connect(host, key, known_hosts, no_host_key_check) as conn:
            outcome = kernel_headers.install(conn, detection.identify(detection.read_remote(conn)), kernel)
    else:
        outcome = kernel_headers.install(c, detection.identify(detection.read_local()), kernel)
    verb = "installed" if outcome.installed else "already installed, nothing to do:"
    print(f"{verb} {outcome.package} ({outcome.path})")


ns.add_task(detect)
ns.add_task(headers)


@task(help={"fast": "only the pure tests: no network, Docker, sshd or QEMU (under a minute), in a network "
                    "namespace of their own where unshare allows it",
            "marker": "only tests matching this pytest -m expression over the markers pure, network, docker, "
                      "ssh and lab",
            "k": "only tests matching this pytest -k expression"})
def test(c, fast=False, marker=None, k=None):
    """Run the test suite (real Docker, real QEMU boots, real sshd); the slowest tests are listed at the end."""
    import shlex
    import shutil
    import subprocess
    import sys

    if fast and marker:
        raise Exit("give --fast or --marker, not both", code=2)
    args = [sys.executable, "-m", "pytest"]
    if fast or marker:
        args += ["-m", "pure" if fast else marker]
    if k:
        args += ["-k", k]
    # A pure test that reaches out anyway fails in a namespace without a network, instead of passing by luck.
    if fast and shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"]).returncode == 0:
        args = ["unshare", "--net", *args]
    result = c.run(" ".join(shlex.quote(a) for a in args), warn=True, pty=False)
    if result.exited == 5:
        raise Exit("pytest collected no tests: check the -k/-m selection (a run that tests nothing is no pass)",
                   code=5)
    if result.exited:
        raise Exit(code=result.exited)


ns.add_task(test)




@task(help={"suite": "boot the newest kernel of this Debian suite (with --vmlinuz: the suite whose container "
                     "compiles --headers; default bookworm)",
            "kernel": "boot this full Debian kernel release, e.g. 6.1.0-56-amd64 (searched across suites)",
            "vmlinuz": "boot your own kernel image (any distro's x86_64 bzImage) instead of a Debian one",
            "modules": "the kernel's modules directory (lib/modules/<release>) for tun.ko; "
                       "default: the fetched Debian kernel's",
            "ko": "a toa.ko built for that kernel (default: build it with toa.build)",
            "headers": "with --vmlinuz: the kernel's headers tree to build toa.ko against",
            "json": "print the report as JSON instead of a table",
            "log_dir": "where the serial log and /init go (default: lab/ beside the built toa.ko)",
            "timeout": "seconds before a guest that has not powered off is killed (default: 900)",
            "cycles": "insmod/rmmod cycles with a checked connection in between (default: 100)",
            "fuzz": "random-option handshakes (default: 1000; a quarter more with kind 200 accepted)",
            "seed": "fuzz seed, to replay a run (default: random, printed in the report)",
            "sig_enforce": "boot with module.sig_enforce=1: toa.ko loads only if signed by a key the kernel trusts "
                           "(with --engine bpf also lockdown=integrity: the unsigned toa.ko must be refused and "
                           "the eBPF engine work all the same)",
            "engine": "module (toa.ko, default) or bpf (toa.bpf.o attached by toa-bpf, built into dist/bpf: "
                      "one object for every kernel from 5.10)"},
      auto_shortflags=False)
@user_errors
def verify(c, suite=None, kernel=None, vmlinuz=None, modules=None, ko=None, headers=None, json=False,
           log_dir=None, timeout=900, cycles=100, fuzz=1000, seed=None, sig_enforce=False, engine="module"):
    """Boot a real kernel under QEMU, load toa.ko (or attach the eBPF engine) in it and prove every TOA rule
    with real handshakes."""
    from rich.console import Console

    from toa import build as builder
    from toa import debian, lab

    if engine not in lab.ENGINES:
        raise ToaError(f"--engine must be one of {', '.join(lab.ENGINES)}, not {engine!r}")
    # The eBPF engine needs toa.ko only to show that a kernel enforcing signatures refuses it.
    needs_ko = engine == "module" or sig_enforce
    if sum(bool(x) for x in (kernel, vmlinuz)) + (bool(suite) and not vmlinuz) != 1:
        raise ToaError("give one of --suite SUITE, --kernel RELEASE or --vmlinuz PATH")
    if engine == "bpf" and not sig_enforce and (ko or headers):
        raise ToaError("--engine bpf loads no toa.ko: leave out --ko/--headers (they go with --sig-enforce)")
    if vmlinuz and needs_ko and not (ko or headers):
        raise ToaError("with --vmlinuz give --ko PATH (a built toa.ko) or --headers DIR (to build one)")
    if ko and headers:
        raise ToaError("give --ko or --headers, not both")
    if seed is not None and not str(seed).isdigit():
        raise ToaError(f"--seed must be a non-negative integer, not {seed!r}")
    console = Console(stderr=True)
    counts = {"PASS": 0, "FAIL": 0}

    def build_ko(headers_dir, release, build_suite):
        return builder.build_module(headers_dir, release, build_suite, Path("dist"),
                                    progress=lambda message: step(f"build: {message}")).ko

    def lab_step(message):
        verdict = message.rsplit(" ", 1)[-1]
        if verdict in counts:
            counts[verdict] += 1
            message = f"{counts['PASS']} passed, {counts['FAIL']} failed; last: {message}"
        step(f"lab: {message}")

    with progress(console) as step:
        bpf = None
        if engine == "bpf":
            from toa import engine_bpf

            bpf = engine_bpf.build(engine_bpf.DEFAULT_OUT, progress=lambda message: step(f"build: {message}"))
        if vmlinuz:
            vmlinuz_path = Path(vmlinuz)
            if not vmlinuz_path.is_file():
                raise ToaError(f"kernel image {vmlinuz} not found")
            release = lab.kernel_release(vmlinuz_path)
            modules_dir = Path(modules) if modules else None
            ko_path = (Path(ko) if ko else build_ko(Path(headers), release, suite or "bookworm")) if needs_ko else None
        else:
            pkgs, tree = debian.prepare(kernel, suite, progress=step)
            release, vmlinuz_path = tree.release, tree.vmlinuz
            modules_dir = Path(modules) if modules else tree.modules_dir
            ko_path = (Path(ko) if ko else build_ko(tree.headers_dir, release, pkgs.suite)) if needs_ko else None
        if bpf:
            console.print(f"kernel {release}: {vmlinuz_path}, eBPF engine {bpf.object} (sha256 {bpf.object_sha256}) "
                          f"and {bpf.loader}" + (f", refused module {ko_path}" if ko_path else ""), soft_wrap=True)
            default_log_dir = bpf.object.parent / "lab" / release
        else:
            console.print(f"kernel {release}: {vmlinuz_path}, module {ko_path}", soft_wrap=True)
            default_log_dir = (Path("dist") / release if ko else ko_path.parent) / "lab"
        report = lab.verify(
            vmlinuz_path, ko_path, release, modules_dir,
            log_dir=Path(log_dir) if log_dir else default_log_dir,
            timeout=float(timeout), cycles=int(cycles), fuzz=int(fuzz),
            seed=int(seed) if seed is not None else None, progress=lab_step, sig_enforce=sig_enforce,
            engine=engine, bpf=bpf,
        )
    if json:
        print_json(report.to_dict())
    else:
        _print_report(report, console)
    if not report.ok:
        raise Exit(code=1)


def _print_report(report, console):
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    engine = f" ({report.engine} engine, object sha256 {report.object_sha256})" if report.engine == "bpf" else ""
    table = Table(title=f"toa verify: {report.release}{engine}", title_justify="left")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        result = Text("PASS", style="green") if check.passed else Text("FAIL", style="bold red")
        table.add_row(Text(check.name), result, Text(check.detail[:160]))
    Console().print(table)
    if not report.ok:
        console.print("last lines of the serial console:")
        for line in report.serial_tail:
            console.print(line, markup=False, highlight=False)
    passed = sum(check.passed for check in report.checks)
    console.print(
        f"{'PASS' if report.ok else 'FAIL'}: {passed}/{len(report.checks)} checks on {report.release} "
        f"({report.engine} engine) in "
        f"{report.duration:.0f}s (fuzz seed {report.seed}); serial log {report.serial_log}",
        soft_wrap=True,
    )


ns.add_task(verify)


# The tasks of each later concern live in toa/commands/<concern>.py and are gathered here.
from toa.commands import build as build_commands  # noqa: E402
from toa.commands import deploy as deploy_commands  # noqa: E402
from toa.commands import export as export_commands  # noqa: E402
from toa.commands import matrix as matrix_commands  # noqa: E402
from toa.commands import package as package_commands  # noqa: E402
from toa.commands import render as render_commands  # noqa: E402

for concern_task in (build_commands.build, build_commands.images, build_commands.preflight, render_commands.render,
                     deploy_commands.deploy, deploy_commands.status, package_commands.package,
                     package_commands.sign, export_commands.export, matrix_commands.matrix):
    ns.add_task(concern_task)
