"""`invoke verify`: boot a real kernel under QEMU and prove toa in it (the module or the eBPF engine)."""

from pathlib import Path

from invoke import Exit, task

from toa.commands.common import print_json, print_table, progress, user_errors, verdict, whole_number
from toa.errors import ToaError


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
           log_dir=None, timeout=None, cycles=None, fuzz=None, seed=None, sig_enforce=False, engine="module"):
    """Boot a real kernel under QEMU, load toa.ko (or attach the eBPF engine) in it and prove every TOA rule
    with real handshakes."""
    from rich.console import Console

    from toa import build as builder
    from toa import lab, prove

    if engine not in lab.ENGINES:
        raise ToaError(f"--engine must be one of {', '.join(lab.ENGINES)}, not {engine!r}")
    timeout, cycles, fuzz = (whole_number(timeout, "--timeout", 1, 900), whole_number(cycles, "--cycles", 0, 100),
                             whole_number(fuzz, "--fuzz", 0, 1000))
    seed = whole_number(seed, "--seed", 0)
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
    settings = prove.LabSettings(fuzz=fuzz, cycles=cycles, timeout=float(timeout), seed=seed)

    with progress(console) as step:
        bpf = None
        if engine == "bpf":
            from toa import engine_bpf

            bpf = engine_bpf.build(engine_bpf.DEFAULT_OUT, progress=lambda message: step(f"build: {message}"))
        if not vmlinuz:  # a Debian kernel: the one pipeline, fetch -> build -> lab
            proof = prove.prove(kernel, suite, settings=settings, engine=engine, ko=Path(ko) if ko else None,
                                modules_dir=Path(modules) if modules else None,
                                bpf=bpf, sig_enforce=sig_enforce, log_dir=Path(log_dir) if log_dir else None,
                                progress=step)
            proof.raise_failure()
            report, release, ko_path = proof.report, proof.release, proof.ko
            vmlinuz_path = proof.fetched.tree.vmlinuz
        else:  # your own kernel image: no fetch; toa.ko given or built against --headers
            vmlinuz_path = Path(vmlinuz)
            if not vmlinuz_path.is_file():
                raise ToaError(f"kernel image {vmlinuz} not found")
            release = lab.kernel_release(vmlinuz_path)
            ko_path = None
            if needs_ko:
                ko_path = Path(ko) if ko else builder.build_module(
                    Path(headers), release, suite or "bookworm", Path("dist"),
                    progress=lambda message: step(f"build: {message}")).ko
            default_log_dir = (bpf.object.parent / "lab" / release if bpf
                               else (Path("dist") / release if ko else ko_path.parent) / "lab")
            report = lab.verify(
                vmlinuz_path, ko_path, release, Path(modules) if modules else None,
                log_dir=Path(log_dir) if log_dir else default_log_dir,
                timeout=settings.timeout, cycles=cycles, fuzz=fuzz, seed=seed, progress=prove.lab_progress(step),
                sig_enforce=sig_enforce, engine=engine, bpf=bpf,
            )
    if bpf:
        console.print(f"kernel {release}: {vmlinuz_path}, eBPF engine {bpf.object} (sha256 {bpf.object_sha256}) "
                      f"and {bpf.loader}" + (f", refused module {ko_path}" if ko_path else ""), soft_wrap=True)
    else:
        console.print(f"kernel {release}: {vmlinuz_path}, module {ko_path}", soft_wrap=True)
    if json:
        print_json("verify", [report.to_dict()])
    else:
        _print_report(report, console)
    if not report.ok:
        raise Exit(code=1)


def _print_report(report, console):
    engine = f" ({report.engine} engine, object sha256 {report.object_sha256})" if report.engine == "bpf" else ""
    print_table(f"toa verify: {report.release}{engine}", ("check", "result", "detail"),
                [(check.name, verdict(check.passed), check.detail[:160]) for check in report.checks])
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
