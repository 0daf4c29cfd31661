"""Preflight: will the target kernel's module loader accept this toa.ko?

A module can have the right vermagic and still be refused at insmod. Each check reads the module (ELF,
through pyelftools) and the facts of the target kernel's build tree (its release, .config,
Module.symvers and, in full source trees, the x86 module loader's source):

- vermagic: the module was built for this release;
- relocations: every relocation type is one the loader handles (R_X86_64_PLT32 only from 4.16 on, or
  where the tree's loader source or a known distro backport says so; modules linked by binutils >= 2.31
  carry it, and an older loader fails with "Unknown rela relocation: 4");
- symbol versions: each imported symbol's CRC is the tree's ("disagrees about version of symbol");
- supported: a SUSE kernel that refuses unsupported modules gets one tagged `supported`;
- signature: a kernel that forces module signatures gets a signed module.

A failed check refuses the artifact the way a vermagic mismatch does; its message names the check, the
evidence and the fix. The results go into the manifest.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toa.errors import ToaError
from toa.kernel import validate_release

R_X86_64_PLT32 = 4
# The relocation types x86_64 module loaders handle (arch/x86/kernel/module.c), PLT32 aside.
OLD_LOADER_RELOCATIONS = {0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32", 10: "R_X86_64_32",
                          11: "R_X86_64_32S", 24: "R_X86_64_PC64"}
RELOCATION_NAMES = {**OLD_LOADER_RELOCATIONS, R_X86_64_PLT32: "R_X86_64_PLT32"}
PLT32_SINCE = (4, 16)
# Distro kernels older than 4.16 whose loader was measured to accept R_X86_64_PLT32 (a backport of
# "x86: Treat R_X86_64_PLT32 as R_X86_64_PC32"): a release pattern whose group is the build number,
# the first build measured, and what showed it.
PLT32_BACKPORTS = [
    (re.compile(r"3\.10\.0-([0-9]+)(\.[0-9.]+)?\.el7\..*"), 1127,
     "RHEL 7.8 (3.10.0-1127) and later load such modules (measured)"),
]
# Where a tree's files live, relative to its top (a kernel's /lib/modules/<release>/build).
TREE_FILES = ("Makefile", ".config", "Module.symvers", "include/generated/utsrelease.h",
              "include/config/kernel.release", "arch/x86/kernel/module.c")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Module:
    """What the checks read from a .ko."""

    vermagic: str
    modinfo: dict[str, str]
    relocation_types: frozenset[int]
    crcs: dict[str, int]  # imported symbol -> the CRC the module was built against (__versions)
    signed: bool


@dataclass
class Tree:
    """What the checks read from the target kernel's build tree."""

    release: str
    config: dict[str, str] = field(default_factory=dict)
    symvers: dict[str, int] | None = None  # None: the tree has no Module.symvers
    loader_source: str | None = None  # arch/x86/kernel/module.c where the tree carries it
    where: str = "the kernel tree"
    found_release: str | None = None  # the release the tree says it is for
    symvers_file: str | None = None  # where the CRCs were read, for messages

    def __post_init__(self):
        if self.symvers_file is None:
            self.symvers_file = f"{self.where}/Module.symvers"


# ---------------------------------------------------------------- reading the module


# Modules already read, by the sha256 of their bytes: a deploy checks one toa.ko against every host's
# kernel, and reading it (ELF, every relocation) costs more than all the rest of a host's checks.
_READ: dict[bytes, Module] = {}
_READ_KEEP = 8


def read_module(data: bytes) -> Module:
    key = hashlib.sha256(data).digest()
    module = _READ.get(key)
    if module is None:
        module = _read_module(data)
        if len(_READ) >= _READ_KEEP:
            _READ.clear()
        _READ[key] = module
    return module


def _read_module(data: bytes) -> Module:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    from toa.ko import SIGNATURE_MAGIC, modinfo

    info = modinfo(data)
    try:
        elf = ELFFile(io.BytesIO(data))
        types = frozenset(kind for section in elf.iter_sections() if isinstance(section, RelocationSection)
                          for kind in _relocation_types(elf, section))
        versions = elf.get_section_by_name("__versions")
        crcs = _versions(versions.data()) if versions is not None else {}
        ext_crcs, ext_names = (elf.get_section_by_name(n) for n in ("__version_ext_crcs", "__version_ext_names"))
        if ext_crcs is not None and ext_names is not None:
            names = ext_names.data().split(b"\0")
            values = struct.unpack(f"<{ext_crcs.data_size // 4}I", ext_crcs.data())
            crcs.update({name.decode(): crc for name, crc in zip(names, values)})
    except (ELFError, struct.error) as error:
        raise ToaError(f"the module is not a readable ELF file ({error}): rebuild it") from None
    return Module(vermagic=info.get("vermagic", ""), modinfo=info, relocation_types=types, crcs=crcs,
                  signed=data.endswith(SIGNATURE_MAGIC))


def _relocation_types(elf, section) -> set[int]:
    """The relocation types of one REL or RELA section, read from its raw entries (r_info's type
    field): pyelftools' per-entry parsing takes about a second for toa.ko's tens of thousands."""
    wide = elf.elfclass == 64
    layout = ("QQq" if section.is_RELA() else "QQ") if wide else ("IIi" if section.is_RELA() else "II")
    form = ("<" if elf.little_endian else ">") + layout
    if section["sh_entsize"] != struct.calcsize(form):  # an unusual layout: the slow, general reader
        return {reloc["r_info_type"] for reloc in section.iter_relocations()}
    mask = 0xFFFFFFFF if wide else 0xFF  # ELF64_R_TYPE, ELF32_R_TYPE
    return {entry[1] & mask for entry in struct.iter_unpack(form, section.data())}


def _versions(data: bytes) -> dict[str, int]:
    """struct modversion_info { unsigned long crc; char name[64 - sizeof(long)]; }[] on x86_64."""
    crcs = {}
    for offset in range(0, len(data) - len(data) % 64, 64):
        crc, raw = struct.unpack_from("<Q56s", data, offset)
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        if name:
            crcs[name] = crc & 0xFFFFFFFF
    return crcs


# ---------------------------------------------------------------- reading the tree


def parse_config(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$", text, re.M))


def parse_symvers(text: str) -> dict[str, int]:
    """Module.symvers: CRC, symbol, module, export type[, namespace], tab-separated."""
    symbols = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].startswith("0x"):
            try:
                symbols[parts[1]] = int(parts[0], 16)
            except ValueError:
                continue
    return symbols


def tree_release(files: dict[str, str]) -> str | None:
    """The release a tree is for: UTS_RELEASE of utsrelease.h (kernel.release holds the upstream version
    on Debian's headers)."""
    match = re.search(r'#define UTS_RELEASE "([^"]+)"', files.get("include/generated/utsrelease.h", ""))
    if match:
        return match.group(1)
    release = files.get("include/config/kernel.release", "").strip()
    return release or None


def tree_from_files(files: dict[str, str], release: str, where: str) -> Tree:
    """The tree of RELEASE from the texts of its TREE_FILES (the ones it has)."""
    return Tree(release=release, config=parse_config(files.get(".config", "")),
                symvers=parse_symvers(files["Module.symvers"]) if "Module.symvers" in files else None,
                loader_source=files.get("arch/x86/kernel/module.c"), where=where, found_release=tree_release(files))


def read_tree(tree_dir: Path, release: str, where: str | None = None) -> Tree:
    """The facts of a build tree on this machine (a headers directory, or a full kernel source tree);
    WHERE names it in messages (default: its path)."""
    tree_dir = Path(tree_dir)
    if not tree_dir.is_dir():
        raise ToaError(f"no kernel tree at {tree_dir}: pass --headers DIR, the tree of {release}")
    files = {}
    for name in TREE_FILES:
        try:
            files[name] = (tree_dir / name).read_text(errors="replace")
        except OSError:
            continue
    return tree_from_files(files, release, where or str(tree_dir))


# ---------------------------------------------------------------- the checks


def _version(release: str) -> tuple[int, int]:
    match = re.match(r"([0-9]+)\.([0-9]+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def loader_takes_plt32(tree: Tree) -> tuple[bool, str]:
    """Whether the tree's module loader handles R_X86_64_PLT32, and the evidence."""
    if tree.loader_source is not None:
        handled = "R_X86_64_PLT32" in tree.loader_source
        return handled, f"its loader source ({tree.where}/arch/x86/kernel/module.c) " + (
            "handles R_X86_64_PLT32" if handled else "has no case for R_X86_64_PLT32")
    for pattern, first_build, evidence in PLT32_BACKPORTS:
        match = pattern.fullmatch(tree.release)
        if match and int(match.group(1)) >= first_build:
            return True, evidence
    if _version(tree.release) >= PLT32_SINCE:
        return True, "kernels from 4.16 on handle R_X86_64_PLT32"
    return False, f"{tree.release} predates 4.16, where the loader learnt R_X86_64_PLT32, and no known backport covers it"


def check_vermagic(module: Module, tree: Tree) -> Check:
    built_for = module.vermagic.split(" ", 1)[0]
    if not module.vermagic:
        return Check("vermagic", False, "the module has no vermagic: it was not built by kbuild; rebuild it")
    if built_for != tree.release:
        return Check("vermagic", False, f"its vermagic {module.vermagic!r} is for another kernel than "
                                        f"{tree.release}: build it against the headers of {tree.release}")
    if tree.found_release and tree.found_release != tree.release:
        return Check("vermagic", False, f"{tree.where} is the tree of {tree.found_release}, not of {tree.release}: "
                                        f"check it against the tree of {tree.release}")
    return Check("vermagic", True, module.vermagic.strip())


def check_relocations(module: Module, tree: Tree, linker: str | None = None) -> Check:
    unknown = sorted(t for t in module.relocation_types if t not in RELOCATION_NAMES)
    if unknown:
        return Check("relocations", False, f"relocation types {unknown} that no x86_64 module loader handles: "
                                           "rebuild with the kernel's own toolchain")
    if R_X86_64_PLT32 in module.relocation_types:
        takes, evidence = loader_takes_plt32(tree)
        if not takes:
            linked = f"linked by {linker}" if linker else "linked by binutils 2.31 or newer"
            return Check("relocations", False, f"the module carries R_X86_64_PLT32 relocations ({linked}); "
                                               f"{evidence}, so insmod would fail with 'Unknown rela relocation: "
                                               "4': build in the distro's own container (its binutils)")
        return Check("relocations", True, f"R_X86_64_PLT32 present; {evidence}")
    return Check("relocations", True, "only relocation types every x86_64 loader handles")


def check_symbol_versions(module: Module, tree: Tree) -> Check:
    if tree.symvers is None:
        return Check("symbol versions", True, f"not checked: {tree.where} has no Module.symvers")
    if tree.config.get("CONFIG_MODVERSIONS") != "y" and not module.crcs:
        return Check("symbol versions", True, "the kernel is built without CONFIG_MODVERSIONS")
    if not module.crcs:
        return Check("symbol versions", False, f"the module carries no symbol CRCs but {tree.release} checks "
                                               "them (CONFIG_MODVERSIONS): build it against that kernel's tree")
    wrong = [(name, crc, tree.symvers[name]) for name, crc in sorted(module.crcs.items())
             if name in tree.symvers and tree.symvers[name] != crc]
    missing = [name for name in sorted(module.crcs) if name not in tree.symvers and name != "module_layout"]
    if wrong:
        name, ours, theirs = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return Check("symbol versions", False,
                     f"the module disagrees about version of symbol {name}{more}: built against CRC "
                     f"0x{ours:08x}, {tree.symvers_file} has 0x{theirs:08x}; rebuild against that tree")
    if missing:
        return Check("symbol versions", False,
                     f"{tree.release} exports no {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                     + ": the module was built against another kernel's tree; rebuild against this one")
    return Check("symbol versions", True, f"{len(module.crcs)} symbol CRCs match {tree.symvers_file}")


def check_supported(module: Module, tree: Tree) -> Check:
    if tree.config.get("CONFIG_SUSE_KERNEL_SUPPORTED") != "y":
        return Check("supported", True, "the kernel does not check a supported tag")
    tag = module.modinfo.get("supported")
    if tag in ("yes", "external"):
        return Check("supported", True, f"supported={tag}")
    return Check("supported", False, "the kernel refuses unsupported modules (CONFIG_SUSE_KERNEL_SUPPORTED) and "
                                     "the module has no supported tag: build it with toa against that kernel's "
                                     "tree (which tags it supported=external)")


def check_signature(module: Module, tree: Tree) -> Check:
    if tree.config.get("CONFIG_MODULE_SIG_FORCE") == "y" and not module.signed:
        return Check("signature", False, "the kernel refuses unsigned modules (CONFIG_MODULE_SIG_FORCE): sign it "
                                         "with a key the kernel trusts (invoke sign --key KEY --cert CERT)")
    if module.signed:
        return Check("signature", True, "signed")
    if tree.config.get("CONFIG_MODULE_SIG") == "y":
        return Check("signature", True, "unsigned; the kernel loads it unless booted with module.sig_enforce=1 "
                                        "or under Secure Boot lockdown")
    return Check("signature", True, "the kernel does not check signatures")


def run(module: Module, tree: Tree, linker: str | None = None) -> list[Check]:
    """Every check of a module (read_module) against the tree, in order."""
    return [check_vermagic(module, tree), check_relocations(module, tree, linker),
            check_symbol_versions(module, tree), check_supported(module, tree), check_signature(module, tree)]


def refusal(checks: list[Check], release: str) -> str | None:
    """The one-line reason to refuse a module, or None when every check passed."""
    failed = [check for check in checks if not check.ok]
    if not failed:
        return None
    first = failed[0]
    more = f" (also failed: {', '.join(c.name for c in failed[1:])})" if len(failed) > 1 else ""
    return f"preflight {first.name} check refused the toa.ko for {release}: {first.detail}{more}"


def as_manifest(checks: list[Check]) -> list[dict]:
    return [asdict(check) for check in checks]


# ---------------------------------------------------------------- any module, any tree (invoke preflight)


def default_tree(release: str) -> Path:
    """The tree of RELEASE when none is given: this machine's /lib/modules/<release>/build, else a
    Debian kernel's headers fetched into toa's cache."""
    from toa import debian

    installed = Path("/lib/modules") / release / "build"
    if (installed / "Makefile").is_file():
        return installed
    if debian.is_debian_release(release):
        return debian.prepare(release, None)[1].headers_dir
    raise ToaError(f"no kernel tree for {release} at {installed}: pass --headers DIR, that kernel's build tree")


def check_file(ko: Path, release: str | None = None, tree_dir: Path | None = None) -> tuple[str, list[Check]]:
    """(release, checks) of a module file against RELEASE's tree (default: the release of its vermagic)."""
    from toa.ko import modinfo
    from toa.ko import read_module as module_bytes

    if release is not None:
        validate_release(release)
    ko = Path(ko)
    if not ko.is_file():
        raise ToaError(f"{ko} not found: pass --ko FILE, a built module")
    modinfo(ko)  # names the file when it is not a module
    module = read_module(module_bytes(ko))
    if release is None:
        release = module.vermagic.split(" ", 1)[0]
        if not release:
            raise ToaError(f"{ko} has no vermagic: pass --kernel RELEASE")
    validate_release(release)
    tree = read_tree(tree_dir or default_tree(release), release)
    return release, run(module, tree)


# ---------------------------------------------------------------- a host's kernel (invoke deploy)

HOST_CONFIG_KEYS = ("CONFIG_MODVERSIONS", "CONFIG_MODULE_SIG", "CONFIG_MODULE_SIG_FORCE",
                    "CONFIG_SUSE_KERNEL_SUPPORTED")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.$]{0,127}")


def host_tree_command(release: str, symbols: list[str]) -> str:
    """One command printing what a host has of RELEASE's tree as @@-tagged lines (see parse_host_tree):
    the build tree's files where headers are installed, else the /boot/config-* and /boot/symvers-*.gz
    that RHEL, SUSE and Debian ship beside the kernel."""
    import shlex

    q = shlex.quote
    validate_release(release)
    wanted = " ".join(name for name in symbols if _SYMBOL.fullmatch(name))
    keys = "|".join(HOST_CONFIG_KEYS)
    config_lines = "s/^((" + keys + ")=.*)$/@@set \\1/p"
    return "\n".join([
        f"b=/lib/modules/{release}/build; r={q(release)}",
        'if [ -f "$b/.config" ]; then c="$b/.config"; elif [ -f "/boot/config-$r" ]; then c="/boot/config-$r"; '
        'else c=; fi',
        f'[ -n "$c" ] && echo "@@config $c" && sed -n -E {q(config_lines)} "$c"',
        'if [ -f "$b/Module.symvers" ]; then s="$b/Module.symvers"; read_s=cat; '
        'elif [ -f "/boot/symvers-$r.gz" ]; then s="/boot/symvers-$r.gz"; read_s=zcat; else s=; fi',
        # only the lines of the module's own symbols, matched whole
        f'if [ -n "$s" ]; then echo "@@symvers $s"; "$read_s" "$s" | awk -F "\\t" -v want={q(wanted)} '
        + q('BEGIN { n = split(want, names, " "); for (i = 1; i <= n; i++) w[names[i]] = 1 } '
            '($2 in w) { print "@@crc " $1 " " $2 }') + '; fi',
        'if [ -f "$b/arch/x86/kernel/module.c" ]; then '
        'if grep -q R_X86_64_PLT32 "$b/arch/x86/kernel/module.c"; then echo "@@loader plt32"; '
        'else echo "@@loader old"; fi; fi',
        "true",
    ]) + "\n"


def parse_host_tree(output: str, release: str, host: str) -> Tree:
    """The Tree a host_tree_command printed (config from the build tree or /boot, CRCs of the module's symbols)."""
    tree = Tree(release=release, where=f"{host}'s kernel")
    symvers: dict[str, int] = {}
    for line in output.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "@@set":
            name, _, value = rest.partition("=")
            if name in HOST_CONFIG_KEYS:
                tree.config[name] = value.strip()
        elif tag == "@@symvers":
            tree.symvers, tree.symvers_file = symvers, f"{host}:{rest.strip()}"
        elif tag == "@@crc":
            crc, _, name = rest.partition(" ")
            try:
                symvers[name.strip()] = int(crc, 16)
            except ValueError:
                continue
        elif tag == "@@loader":
            # the check reads the loader's text: a stand-in that says what the host's source has
            tree.loader_source = "R_X86_64_PLT32" if rest.strip() == "plt32" else ""
    if tree.symvers is not None and not symvers:
        tree.symvers = None  # every kernel exports some of the module's symbols: none means the file was not read
    return tree
