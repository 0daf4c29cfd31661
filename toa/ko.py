"""Kernel module files (.ko, and the .ko.xz/.ko.zst/.ko.gz that distros ship): bytes and .modinfo."""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
from pathlib import Path

from toa.errors import ToaError

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# What ends a signed module (after the PKCS#7 blob and its struct module_signature).
SIGNATURE_MAGIC = b"~Module signature appended~\n"


def read_module(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed (6.12+ Debian kernels ship .ko.xz)."""
    data = Path(path).read_bytes()
    name = Path(path).name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ToaError(f"{path} is zstd-compressed: install the zstd package")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def modinfo(module: Path | bytes) -> dict[str, str]:
    """The key=value pairs of a module's .modinfo section (a file, or its bytes)."""
    # Imported here: pyelftools costs a noticeable share of a warm `invoke build` that reads no module.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    data = read_module(module) if isinstance(module, Path) else module
    try:
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError:
        section = None
    if section is None:
        what = module if isinstance(module, Path) else "a module handed to toa"
        raise ToaError(f"{what} has no .modinfo section: it is not a kernel module")
    info: dict[str, str] = {}
    for entry in section.data().split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info
