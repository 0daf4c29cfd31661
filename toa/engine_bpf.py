"""The eBPF engine: build toa.bpf.o (one object for every kernel from 5.10) and its loader, toa-bpf.

The object is compiled with clang for the BPF target from toa/bpf/toa.bpf.c, against UAPI headers only
(no kernel's BTF, no CO-RE), and stripped of DWARF (its BTF stays: libbpf reads the maps from it). The
loader, toa/bpf/loader.c, embeds that object and is linked statically against libbpf, libelf and zlib,
so a host needs nothing beyond its kernel. Both are built on this machine (Debian 12's clang 14 and
libbpf 1.1; scripts/setup.sh installs them), into dist/bpf/ with a manifest: sha256 of each file and
the tools' versions (toa.artifacts owns that layout and its verification). The build is reproducible: the same sources and tools give the same bytes
wherever the tree is checked out.
"""

from __future__ import annotations

import datetime
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import toa
from toa import artifacts
from toa.artifacts import BpfArtifact
from toa.errors import ToaError
from toa.resources import BPF_SOURCE

SOURCE_DIR = BPF_SOURCE
SOURCES = ("toa.bpf.c", "toa_maps.h", "loader.c")
OBJECT_NAME = artifacts.BPF_OBJECT_NAME
LOADER_NAME = artifacts.BPF_LOADER_NAME
DEFAULT_OUT = artifacts.bpf_directory()
# toa.artifacts defines the build's artifact; toa.deploy reaches both through this module.
BpfBuild = BpfArtifact
sha256 = artifacts.sha256
# What the engine needs from a kernel, said wherever it is refused.
KERNEL_NEEDS = "Linux 5.10 or later with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and cgroup v2"
PACKAGES = "clang llvm libbpf-dev libelf-dev zlib1g-dev gcc libc6-dev"
# libbpf's own lines, the verifier's log among them, are kept short in a report.
LIBBPF_LIBS = ("-lbpf", "-lelf", "-lz")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToaError(f"{name} not found: the BPF engine is built with {PACKAGES} (apt-get install them, "
                       "or run scripts/setup.sh)")
    return path


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
        detail = "; ".join(line.strip() for line in errors[:3]) or f"exit status {result.returncode}"
        raise ToaError(f"{what} failed: {detail}")
    return result.stdout


def toolchain() -> dict[str, str]:
    """The tools' versions: they decide the bytes, so they are part of the manifest."""
    clang = _first_line(_run([_tool("clang"), "--version"], "clang --version"))
    gcc = _first_line(_run([_tool("gcc"), "--version"], "gcc --version"))
    strip_lines = _run([_tool("llvm-strip"), "--version"], "llvm-strip --version").splitlines()
    strip = next((line.strip() for line in strip_lines if "version" in line.lower()), _first_line("\n".join(strip_lines)))
    libbpf = ""
    if shutil.which("dpkg-query"):
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libbpf-dev"], capture_output=True, text=True)
        libbpf = result.stdout.strip() if result.returncode == 0 else ""
    return {"clang": clang, "gcc": gcc, "llvm_strip": strip, "libbpf_dev": libbpf or "unknown"}


def source_hash(source_dir: Path = SOURCE_DIR) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (source_dir / name).read_bytes() + b"\0")
    return digest.hexdigest()


def compile_object(source_dir: Path, out: Path) -> None:
    """clang -target bpf, UAPI headers only; DWARF stripped, BTF kept; no build path in the bytes."""
    clang, strip = _tool("clang"), _tool("llvm-strip")
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    include = [f"-I/usr/include/{multiarch}"] if multiarch else []
    full = out.with_suffix(".debug.o")
    _run([clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", *include,
          f"-fdebug-prefix-map={source_dir}=.", "-c", "toa.bpf.c", "-o", str(full)],
         "compiling toa.bpf.c (clang -target bpf)", cwd=source_dir)
    _run([strip, "-g", str(full), "-o", str(out)], "stripping toa.bpf.o (llvm-strip -g)")
    full.unlink()


def link_loader(source_dir: Path, object_path: Path, object_sha256: str, out: Path) -> None:
    """The loader, static, with the object embedded (.incbin) and its sha256 compiled in."""
    gcc = _tool("gcc")
    _run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", f'-DTOA_BPF_OBJECT="{object_path}"',
          f'-DTOA_BPF_SHA256="{object_sha256}"', "-o", str(out), str(source_dir / "loader.c"), *LIBBPF_LIBS],
         "linking toa-bpf statically (gcc -static ... -lbpf -lelf -lz; needs libbpf-dev, libelf-dev, zlib1g-dev)")


def build(out_dir: Path = DEFAULT_OUT, *, progress: Callable[[str], None] | None = None,
          force: bool = False, source_dir: Path = SOURCE_DIR) -> BpfArtifact:
    """Build toa.bpf.o and toa-bpf into OUT_DIR with manifest.json; an identical build is kept."""
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    source_dir = Path(source_dir).resolve()
    tools = toolchain()
    digest = source_hash(source_dir)
    if not force:
        kept = artifacts.bpf_up_to_date(out_dir, digest, tools)
        if kept:
            say(f"BPF engine up to date in {out_dir}")
            return kept
    with tempfile.TemporaryDirectory(prefix="toa-bpf-") as scratch_name:
        scratch = Path(scratch_name)
        say("compiling toa.bpf.c (clang -target bpf)")
        compile_object(source_dir, scratch / OBJECT_NAME)
        object_sha256 = sha256(scratch / OBJECT_NAME)
        say("linking toa-bpf (static, libbpf)")
        link_loader(source_dir, scratch / OBJECT_NAME, object_sha256, scratch / LOADER_NAME)
        return artifacts.write_bpf(out_dir, scratch / OBJECT_NAME, scratch / LOADER_NAME, {
            "engine": "bpf",
            "toa_version": toa.__version__,
            "object": {"target": "bpfel (little-endian: x86_64, arm64)", "kernels": KERNEL_NEEDS},
            "loader": {"linked": "static (libbpf, libelf, zlib)", "embeds_object_sha256": object_sha256},
            "source_hash": digest,
            "toolchain": tools,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
