"""The one QEMU layer: what boots a kernel for a test, shared by the lab (toa/lab.py: a busybox guest
that runs its checks and powers off) and the fleet (toa/guests.py: Debian guests with systemd and sshd).

- the host tools: QEMU itself and a static busybox;
- the initramfs: a newc cpio archive, gzipped, with busybox, an /init and the kernel modules it loads
  (each with what it depends on, read from the modules' .modinfo);
- QEMU's arguments for a direct kernel boot (-kernel/-initrd/-append), TCG, one vCPU;
- a VM's serial console: streamed line by line into a log until the guest powers off (the lab), or
  appended to a file that survives restarts and is read from an offset (the fleet).
"""

from __future__ import annotations

import gzip
import io
import os
import selectors
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from elftools.elf.elffile import ELFFile

from toa.errors import ToaError
from toa.ko import SUFFIXES as MODULE_SUFFIXES
from toa.ko import modinfo, read_module

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


# ---------------------------------------------------------------- host tools


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise ToaError(f"{QEMU} not found on PATH: install the qemu-system-x86 package (apt-get install qemu-system-x86)")
    return path


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (it needs no shared libraries)."""
    try:
        with path.open("rb") as stream:
            return not any(segment["p_type"] == "PT_INTERP" for segment in ELFFile(stream).iter_segments())
    except Exception:  # not an ELF file at all
        return False


def find_busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if path.is_file() and is_static_elf(path):
            return path
    raise ToaError("no statically linked busybox in /bin: install the busybox-static package (apt-get install busybox-static)")


# ---------------------------------------------------------------- kernel modules for the guest


def _module_key(name: str) -> str:
    return name.replace("-", "_")


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Module name -> file, over a kernel's modules directory (lib/modules/<release>)."""
    index = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        for suffix in MODULE_SUFFIXES:
            if path.name.endswith(suffix):
                index.setdefault(_module_key(path.name[: -len(suffix)]), path)
    return index


def modules_with_deps(modules_dir: Path, name: str) -> list[tuple[str, bytes]]:
    """`name` and what it depends on (from .modinfo), in load order; [] when the kernel has it built in."""
    index = index_modules(modules_dir)
    if _module_key(name) not in index:
        return []
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(module: str) -> None:
        key = _module_key(module)
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            raise ToaError(f"{name} needs module {module}, which is not in {modules_dir}: pass the full modules directory")
        data = read_module(index[key])
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(dep)
        ordered.append((f"{key}.ko", data))

    visit(name)
    return ordered


# ---------------------------------------------------------------- initramfs


class Cpio:
    """A cpio archive in the kernel's initramfs format (newc), built in memory."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def write_initramfs(path: Path, *, init: str, directories: tuple[str, ...],
                    files: list[tuple[str, bytes, int]] = (), busybox: Path | None = None) -> None:
    """PATH: a gzipped initramfs with DIRECTORIES, INIT as /init, BUSYBOX (default: this machine's static
    one) as bin/busybox, and FILES as (path, bytes, mode)."""
    archive = Cpio()
    for directory in directories:
        archive.directory(directory)
    archive.file("init", init.encode(), 0o755)
    archive.file("bin/busybox", Path(busybox or find_busybox()).read_bytes(), 0o755)
    for name, data, mode in files:
        archive.file(name, data, mode)
    Path(path).write_bytes(gzip.compress(archive.finish(), compresslevel=6))


# ---------------------------------------------------------------- QEMU's arguments


def kernel_argv(vmlinuz: Path, initrd: Path, cmdline: str, *, memory_mb: int, extra: tuple[str, ...] = ()) -> list[str]:
    """QEMU booting VMLINUZ with INITRD and CMDLINE directly (no firmware, no boot loader): TCG, one vCPU;
    EXTRA: the caller's console, disks, network or clock options."""
    return [find_qemu(), "-accel", "tcg", "-smp", "1", "-m", str(memory_mb), *extra,
            "-kernel", str(vmlinuz), "-initrd", str(initrd), "-append", cmdline]


def path_option(path: Path) -> str:
    """A path inside a QEMU -drive/-chardev option, where a comma must be doubled."""
    return str(path).replace(",", ",,")


def serial_to_file(log: Path) -> tuple[str, ...]:
    """QEMU options sending the serial console to LOG, appended: every boot's console is kept, restarts
    after a kill included (read each power-on's part with console_since)."""
    return ("-chardev", f"file,id=console,path={path_option(log)},append=on", "-serial", "chardev:console")


def console_since(log: Path, offset: int) -> str:
    """What the console LOG holds after OFFSET bytes ("" before QEMU has created it)."""
    if not Path(log).is_file():
        return ""
    with Path(log).open("rb") as console:
        console.seek(offset)
        return console.read().decode(errors="replace")


# ---------------------------------------------------------------- a guest that runs to its power-off


@dataclass
class BootResult:
    lines: list[str]
    timed_out: bool
    returncode: int | None


def run_to_exit(argv: list[str], serial_log: Path, timeout: float, on_line: Callable[[str], None]) -> BootResult:
    """Run QEMU, copying its serial console to serial_log line by line; kill it after `timeout` s."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with serial_log.open("w", encoding="utf-8", errors="replace") as log, subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        pending = b""
        timed_out = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not selector.select(timeout=min(remaining, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                lines.append(line)
                log.write(line + "\n")
                on_line(line)
            log.flush()
        if pending:
            line = pending.decode("utf-8", errors="replace").rstrip("\r")
            lines.append(line)
            log.write(line + "\n")
        selector.close()
        if timed_out:
            proc.kill()
        try:
            returncode = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
    return BootResult(lines, timed_out, None if timed_out else returncode)
