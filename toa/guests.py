"""QEMU guests that behave like fleet hosts: a real Debian userland booting a real Debian kernel.

Each guest runs the distro's own init (systemd) and sshd, reachable on a loopback port through QEMU's
user-mode networking, so deploys, reboots and power cuts are exercised against the real thing.

One userland (debootstrap of a Debian suite, configured once: key-only root login, a sudo user,
networkd, units a test host does not need masked) is cached per recipe. Per kernel it becomes an ext4
disk image holding the kernel's own modules (the ones the guest needs, depmod'ed), plus a small busybox
initramfs that loads the disk drivers and switch_roots to /sbin/init. Every guest boots from its own
qcow2 overlay on that image, so guests are independent, a SIGKILL is a power cut (the journal is
replayed at the next mount) and a restart or `systemctl reboot` boots the same kernel again (a reboot
is the guest's own shutdown and reset request, then a fresh QEMU on the same disk).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import jinja2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fabric import Connection
from invoke.exceptions import CommandTimedOut

from toa import debian, qemu, remote
from toa.debian import KernelTree
from toa.errors import ToaError
from toa.kernel import validate_release

LOOPBACK = "127.0.0.1"
# The userland suite; its systemd, sshd and python3 are what the fleet hosts run.
DEFAULT_SUITE = "bookworm"
USERLAND_SUITES = ("bullseye", "bookworm", "trixie")
USERLAND_PACKAGES = (
    "systemd-sysv", "udev", "openssh-server", "kmod", "iproute2", "procps", "e2fsprogs", "sudo",
    "python3",  # Ansible's modules need the full standard library, not only python3-minimal
)
# What a host that builds kernel modules has beyond USERLAND_PACKAGES: a compiler and make, and what
# a Debian kernel's image and headers packages (and dkms) depend on, so that they install from files.
BUILD_HOST_PACKAGES = ("gcc", "make", "dwarves", "libelf1", "linux-base", "initramfs-tools", "dpkg-dev", "patch",
                       "lsb-release")
# An account for deploys that go through sudo (it may run anything without a password).
SUDO_USER = "deployer"
HOSTNAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
DISK_SIZE = "2G"
DEFAULT_MEMORY_MB = 384
# QEMU's user-mode network always hands the guest this address, gateway and DNS.
GUEST_NETWORK = {"address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns": "10.0.2.3"}
# Units a headless test host gains nothing from; masking them shortens every boot under TCG.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "systemd-networkd-wait-online.service", "systemd-firstboot.service",
    "systemd-network-generator.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "dev-hugepages.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "modprobe@dm_mod.service", "modprobe@drm.service", "modprobe@efi_pstore.service", "modprobe@fuse.service",
    "modprobe@loop.service", "systemd-journald-audit.socket",
    # Consoles: the serial getty stays; without a display, the virtual terminals' gettys are waste.
    "getty@tty1.service", "getty-static.service",
)
# Modules the initramfs loads to reach the root disk (with what they depend on; built-in ones are skipped).
BOOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# Modules the guest's own /lib/modules carries beyond those: its NIC, entropy, what systemd asks for
# (autofs4, called autofs since 6.12) and what tests use.
SYSTEM_MODULES = ("virtio_net", "virtio_rng", "autofs4", "autofs", "tun")
# Files of /lib/modules/<release> that depmod and modprobe read besides the modules themselves.
MODULE_INDEX_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
# no_timer_check: a starved TCG vCPU can fail the kernel's early IO-APIC timer test and panic
# ("IO-APIC + timer doesn't work"); virtual machines skip that test.
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0 net.ifnames=0 no_timer_check"
SSH_POLL_SECONDS = 0.5
# A TCG guest on a loaded host can take well over the usual 15 s for the SSH handshake.
SSH_TIMEOUT_SECONDS = 60.0
# A short command that takes longer than this is talking to a guest on its way down.
COMMAND_SECONDS = 30.0
# Time allowed for one guest to boot to SSH under TCG on a busy host, and per extra guest in a fleet.
BOOT_SECONDS = 180.0
BOOT_SECONDS_PER_GUEST = 60.0
# Waiting for sshd: how often the guest is checked (running, no panic), how often a new connection
# is opened while fewer than MAX_OPEN_PROBES wait, and how long one connection waits for the banner.
GUEST_CHECK_SECONDS = 15.0
CONNECT_INTERVAL_SECONDS = 1.5
MAX_OPEN_PROBES = 4
PROBE_PATIENCE_SECONDS = 60.0
SERIAL_TAIL_LINES = 15
# What every kernel prints on the console as it restarts the machine, and as it panics.
RESTART_MESSAGE = "reboot: Restarting system"
RESET_SECONDS = 30.0  # from the kernel's restart message to QEMU's exit on the reset it asks for
PANIC_MESSAGE = "Kernel panic - not syncing"

INIT_TEMPLATE = """#!/bin/busybox sh
# Load the root disk's drivers, mount it and hand over to the distro's own init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{% for module in modules %}
insmod /lib/modules/{{ module }} || echo "guest-initramfs: insmod {{ module }} failed"
{% endfor %}
waited=0
while [ ! -b /dev/vda ] && [ "$waited" -lt 200 ]; do sleep 0.1; waited=$((waited + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "guest-initramfs: cannot mount /dev/vda; powering off"
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
NETWORK_UNIT = """[Match]
Name=eth0

[Network]
Address={address}
Gateway={gateway}
DNS={dns}
"""
SSHD_CONFIG = """# Fleet test host: one ed25519 host key (its public half is handed to clients), keys only.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
# Readiness probes of a slow (TCG) guest can still be pending in sshd when the first real login
# arrives; the default (10) would make sshd drop that login at random.
MaxStartups 100:30:200
"""
SUDOERS = f"{SUDO_USER} ALL=(ALL) NOPASSWD:ALL\n"


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress:
        progress(message)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock so that concurrent runs build one cache entry once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], what: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToaError(f"{argv[0]} not found: install it (see the README's set-up)") from None
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ToaError(f"{what} failed: {tail}")
    return result.stdout


def _recipe_id(*parts: object) -> str:
    """A short digest of what a cache entry is built from, so a changed recipe is rebuilt."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the userland


@dataclass(frozen=True)
class Userland:
    """A configured Debian root tree in the cache and the keys to reach guests booted from it."""

    root: Path
    client_key: Path  # private key accepted for root and SUDO_USER
    host_key: str  # the guests' sshd host key: "ssh-ed25519 AAAA..."


def _userland_dir(suite: str, extra_packages: tuple[str, ...] = ()) -> Path:
    parts = (suite, USERLAND_PACKAGES, SUDO_USER, GUEST_NETWORK, MASKED_UNITS, FSTAB, NETWORK_UNIT, SSHD_CONFIG, SUDOERS)
    # a userland with extra packages is another recipe; the plain one keeps its cache entry
    recipe = _recipe_id(*parts, *((tuple(sorted(extra_packages)),) if extra_packages else ()))
    return debian.cache_dir() / "guests" / f"{suite}-{recipe}"


def _write_client_key(private_path: Path) -> str:
    """An unencrypted OpenSSH ed25519 key pair; returns the public key line."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    private_path.chmod(0o600)  # ssh clients refuse keys others can read
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode()


def _authorize(root: Path, user: str, home: str, public_key: str) -> None:
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(public_key + "\n")
    (ssh_dir / "authorized_keys").chmod(0o600)
    _run(["chroot", str(root), "chown", "-R", f"{user}:{user}", f"{home}/.ssh"], f"chown of {user}'s .ssh")


def _configure(root: Path, client_public_key: str) -> None:
    """Turn a debootstrap'd tree into a headless host: disk, network, sshd, users, fewer units."""
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/hostname").write_text("toa-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "etc/systemd/network/20-eth0.network").write_text(NETWORK_UNIT.format(**GUEST_NETWORK))
    (root / "etc/ssh/sshd_config.d/toa-guest.conf").write_text(SSHD_CONFIG)
    for key in (root / "etc/ssh").glob("ssh_host_*_key*"):
        if not key.name.startswith("ssh_host_ed25519_key"):
            key.unlink()
    _run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", SUDO_USER], f"useradd {SUDO_USER}")
    sudoers = root / "etc/sudoers.d" / SUDO_USER
    sudoers.write_text(SUDOERS)
    sudoers.chmod(0o440)
    _authorize(root, "root", "/root", client_public_key)
    _authorize(root, SUDO_USER, f"/home/{SUDO_USER}", client_public_key)
    _run(["chroot", str(root), "systemctl", "enable", "systemd-networkd.service"], "enabling systemd-networkd")
    _run(["chroot", str(root), "systemctl", "mask", *MASKED_UNITS], "masking units")
    _run(["chroot", str(root), "apt-get", "clean"], "apt-get clean")


def userland(suite: str = DEFAULT_SUITE, progress: Callable[[str], None] | None = None,
             extra_packages: tuple[str, ...] = ()) -> Userland:
    """The configured userland of `suite`, debootstrap'd into the cache on first use; EXTRA_PACKAGES
    (e.g. a compiler, for hosts that build modules) are installed too."""
    if suite not in USERLAND_SUITES:
        raise ToaError(f"unknown guest userland suite {suite!r}: use one of {', '.join(USERLAND_SUITES)}")
    bad = [name for name in extra_packages if not debian.DEB_NAME_RE.fullmatch(name)]
    if bad:
        raise ToaError(f"invalid package name {bad[0][:60]!r} for the guest userland")
    directory = _userland_dir(suite, extra_packages)
    root, client_key = directory / "root", directory / "client_ed25519"
    with _locked(directory.with_name(directory.name + ".lock")):
        if not (directory / ".complete").exists():
            _build_userland(suite, directory, progress, extra_packages)
    host_key = (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
    return Userland(root, client_key, " ".join(host_key[:2]))


def _build_userland(suite: str, directory: Path, progress: Callable[[str], None] | None,
                    extra_packages: tuple[str, ...] = ()) -> None:
    if os.geteuid() != 0:
        raise ToaError("building the guest userland needs root (debootstrap and chroot): run as root")
    shutil.rmtree(directory, ignore_errors=True)  # an interrupted build starts over
    directory.mkdir(parents=True)
    root = directory / "root"
    debian.debootstrap(suite, root, include=USERLAND_PACKAGES + tuple(extra_packages),
                       what=f"the {suite} guest userland", progress=progress)
    _say(progress, "configuring the guest userland")
    _configure(root, _write_client_key(directory / "client_ed25519"))
    (directory / ".complete").write_text(f"{suite} {' '.join(USERLAND_PACKAGES + tuple(extra_packages))}\n")


# ---------------------------------------------------------------- per-kernel images


@dataclass(frozen=True)
class GuestImage:
    """What boots one kernel: its vmlinuz, the initramfs, the root disk and the keys to reach it."""

    release: str
    vmlinuz: Path
    initrd: Path
    disk: Path
    client_key: Path
    host_key: str


def _module_closure(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """`names` and their dependencies as module names in load order, without duplicates or built-ins."""
    ordered: list[str] = []
    for name in names:
        for module, _data in qemu.modules_with_deps(modules_dir, name):
            if module not in ordered:
                ordered.append(module)
    return ordered


def _build_initramfs(path: Path, modules_dir: Path) -> None:
    """An initramfs that loads the disk drivers and switch_roots to the guest's disk."""
    modules: dict[str, bytes] = {}
    for name in BOOT_MODULES:
        for module, data in qemu.modules_with_deps(modules_dir, name):
            modules.setdefault(module, data)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    qemu.write_initramfs(path, init=env.from_string(INIT_TEMPLATE).render(modules=list(modules)),
                         directories=("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"),
                         files=[(f"lib/modules/{module}", data, 0o644) for module, data in modules.items()])


def _install_modules(staging: Path, tree: KernelTree) -> None:
    """The kernel's own index files and the modules the guest needs, then depmod over them."""
    target = staging / "lib/modules" / tree.release
    target.mkdir(parents=True)
    for name in MODULE_INDEX_FILES:
        if (tree.modules_dir / name).is_file():
            shutil.copy2(tree.modules_dir / name, target / name)
    index = qemu.index_modules(tree.modules_dir)
    for module in _module_closure(tree.modules_dir, BOOT_MODULES + SYSTEM_MODULES):
        source = index[module.removesuffix(".ko")]
        destination = target / source.relative_to(tree.modules_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    (target / "extra").mkdir()
    _run(["depmod", "-b", str(staging), tree.release], f"depmod for {tree.release}")


def guest_image(tree: KernelTree, *, suite: str = DEFAULT_SUITE, progress: Callable[[str], None] | None = None,
                extra_packages: tuple[str, ...] = ()) -> GuestImage:
    """The bootable image of a kernel (from toa.debian.prepare) on the suite's userland (with
    EXTRA_PACKAGES), cached."""
    release = validate_release(tree.release)
    if tree.modules_dir is None or not (tree.modules_dir / "kernel").is_dir():
        raise ToaError(f"kernel {release} has no modules directory in the cache: fetch it again with toa.debian")
    base = userland(suite, progress, extra_packages)
    recipe = _recipe_id(BOOT_MODULES, SYSTEM_MODULES, MODULE_INDEX_FILES, INIT_TEMPLATE, DISK_SIZE)
    directory = base.root.parent / f"{release}-{recipe}"
    image = GuestImage(release, tree.vmlinuz, directory / "initrd.gz", directory / "disk.raw",
                       base.client_key, base.host_key)
    with _locked(directory.with_name(directory.name + ".lock")):
        if image.disk.is_file():
            return image
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        _say(progress, f"building the guest disk for {release}")
        with tempfile.TemporaryDirectory(prefix="staging-", dir=directory) as staging_name:
            staging = Path(staging_name) / "root"
            # Hard links: the image gets the userland's files without copying their data.
            _run(["cp", "-al", str(base.root), str(staging)], "copying the guest userland")
            _install_modules(staging, tree)
            unfinished = directory / "disk.raw.partial"
            _run(["mkfs.ext4", "-q", "-F", "-L", "toa-guest", "-d", str(staging), str(unfinished), DISK_SIZE],
                 f"mkfs.ext4 of the {release} guest disk")
            _build_initramfs(image.initrd, tree.modules_dir)
            unfinished.rename(image.disk)
    return image


# ---------------------------------------------------------------- guests


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    if not path.is_file():
        return "(nothing)"
    text = path.read_text(errors="replace").replace("\r", "")
    return " | ".join(line for line in text.splitlines()[-lines:] if line.strip()) or "(empty)"


# Guests started by this process: killed when it exits, so an aborted run leaves no QEMU behind.
_running: set[Guest] = set()


@atexit.register
def _kill_leftover_guests() -> None:
    for guest in list(_running):
        guest.kill()


def _ssh_banner_within(port: int, seconds: float, check: Callable[[], None] = lambda: None) -> bool:
    """True when sshd behind the forwarded port sends its banner within `seconds`; CHECK is called
    every GUEST_CHECK_SECONDS (it raises when waiting longer is pointless: the guest died).

    QEMU accepts on the forwarded port even when nothing listens in the guest: it hangs up when the
    guest refuses, and keeps resending the SYN (with growing delays) while the guest has no network
    yet. So a new connection is opened every CONNECT_INTERVAL_SECONDS while fewer than
    MAX_OPEN_PROBES wait, and any banner counts. A probe is given PROBE_PATIENCE_SECONDS: sshd on a
    guest with a sliver of a loaded host's CPU can take many seconds for its banner, and a probe
    closed sooner wastes that work, so that such a guest would never answer a probe in time.
    """
    deadline = time.monotonic() + seconds
    next_connect = next_check = 0.0
    selector = selectors.DefaultSelector()
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + GUEST_CHECK_SECONDS
                check()
            for key in list(selector.get_map().values()):
                if now - key.data > PROBE_PATIENCE_SECONDS:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
            if now >= next_connect and len(selector.get_map()) < MAX_OPEN_PROBES:
                next_connect = now + CONNECT_INTERVAL_SECONDS
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probe.setblocking(False)
                probe.connect_ex((LOOPBACK, port))
                selector.register(probe, selectors.EVENT_READ, data=now)
            waiting = [key.data for key in selector.get_map().values()]
            # the next thing to do: open a probe (when there is room), give up on the oldest, check
            next_event = next_connect if len(waiting) < MAX_OPEN_PROBES else min(waiting) + PROBE_PATIENCE_SECONDS
            wait = max(0.0, min(next_event, next_check, deadline) - time.monotonic())
            for key, _events in selector.select(timeout=wait):
                try:
                    data = key.fileobj.recv(64)
                except OSError:
                    data = b""
                if data.startswith(b"SSH-"):
                    return True
                selector.unregister(key.fileobj)  # refused or hung up: the guest is not listening yet
                key.fileobj.close()
        return False
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()


@dataclass(eq=False)
class Guest:
    """One QEMU guest with its own overlay disk, reachable by SSH on LOOPBACK:port."""

    name: str
    image: GuestImage
    workdir: Path
    port: int
    ssh_user: str = "root"
    memory_mb: int = DEFAULT_MEMORY_MB
    # Guests share one disk image; each gets its own identity (journal, Ansible facts) at boot.
    machine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen | None = field(default=None, repr=False)
    # Where the console log stood when QEMU last started: what follows is this power-on's output.
    console_start: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not HOSTNAME_RE.fullmatch(self.name):
            raise ToaError(f"invalid guest name {self.name!r}: use lowercase letters, digits and '-'")
        self.workdir = Path(self.workdir).resolve()
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        self.known_hosts.write_text(f"[{LOOPBACK}]:{self.port} {self.image.host_key}\n")

    @property
    def release(self) -> str:
        return self.image.release

    @property
    def overlay(self) -> Path:
        return self.workdir / f"{self.name}.qcow2"

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / f"{self.name}.qemu.log"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / f"{self.name}.known_hosts"

    @property
    def key_path(self) -> Path:
        return self.image.client_key

    def node_line(self, user: str | None = None) -> str:
        """The guest as a nodes.txt line: user@127.0.0.1:port."""
        return f"{user or self.ssh_user}@{LOOPBACK}:{self.port}"

    def ssh_options(self) -> remote.SshOptions:
        return remote.SshOptions(key_filename=str(self.key_path), known_hosts=str(self.known_hosts),
                                 timeout=SSH_TIMEOUT_SECONDS)

    def qemu_argv(self) -> list[str]:
        cmdline = f"{KERNEL_ARGS} systemd.hostname={self.name} systemd.machine_id={self.machine_id}"
        return qemu.kernel_argv(self.image.vmlinuz, self.image.initrd, cmdline, memory_mb=self.memory_mb, extra=(
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",  # see reboot()
            *qemu.serial_to_file(self.serial_log),
            # Default (writeback) caching honours the guest's flushes: a SIGKILL loses only unflushed data.
            "-drive", f"file={qemu.path_option(self.overlay)},if=virtio,format=qcow2",
            "-netdev", f"user,id=net0,hostfwd=tcp:{LOOPBACK}:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",  # entropy for sshd early in boot
        ))

    def create_disk(self) -> None:
        """A fresh overlay on the image: the guest's own writable disk."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overlay.unlink(missing_ok=True)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.disk), "-F", "raw", str(self.overlay)],
             f"qemu-img create for guest {self.name}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Power the guest on (its overlay is created on first start and kept after)."""
        if self.is_running():
            raise ToaError(f"guest {self.name} is already running")
        if not self.overlay.is_file():
            self.create_disk()
        self.console_start = self.serial_log.stat().st_size if self.serial_log.is_file() else 0
        with self.qemu_log.open("a") as log:
            self.process = subprocess.Popen(self.qemu_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        _running.add(self)

    def kill(self) -> None:
        """Pull the plug: SIGKILL QEMU, whatever the guest was doing."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()
        _running.discard(self)

    def _failure(self, what: str) -> ToaError:
        return ToaError(f"guest {self.name} ({self.release}) {what}; QEMU: {_tail(self.qemu_log, 3)}; "
                        f"console: {_tail(self.serial_log)}")

    def wait_for_ssh(self, timeout: float = BOOT_SECONDS) -> float:
        """Block until sshd in the guest sends its banner; returns the seconds waited."""
        started = time.monotonic()

        def check() -> None:
            if not self.is_running():
                raise self._failure(f"stopped before sshd answered (QEMU exit {self.process and self.process.returncode})")
            if PANIC_MESSAGE in self._console_since(self.console_start):
                raise self._failure("kernel panicked before sshd answered")

        if not _ssh_banner_within(self.port, timeout, check):
            check()
            raise self._failure(f"has no sshd answering on port {self.port} after {timeout:.0f}s")
        return time.monotonic() - started

    def connect(self, user: str | None = None) -> Connection:
        """An SSH connection through toa.remote, host key checked against the guest's known_hosts."""
        spec = remote.HostSpec(LOOPBACK, user or self.ssh_user, self.port)
        return remote.connect(spec, self.ssh_options())

    def run(self, command: str, user: str | None = None) -> str:
        """Run a fixed command in the guest; its stdout, or a ToaError when it fails."""
        with self.connect(user) as conn:
            return remote.run(conn, command)

    def boot_id(self, timeout: float = COMMAND_SECONDS) -> str:
        """This boot's random id (a new one after every reboot or restart)."""
        with self.connect() as conn:
            try:
                result = conn.run("cat /proc/sys/kernel/random/boot_id", hide=True, warn=True, in_stream=False,
                                  timeout=timeout)
            except CommandTimedOut:
                raise self._failure(f"did not answer within {timeout:.0f}s") from None
        if result.failed:
            raise self._failure("could not read its boot id")
        return result.stdout.strip()

    def reboot(self, timeout: float = BOOT_SECONDS + BOOT_SECONDS_PER_GUEST) -> float:
        """`systemctl reboot` in the guest, then wait until the new boot answers SSH; returns the seconds.

        The guest shuts down and asks for its reset; QEMU (run with -no-reboot) exits on that request
        and a fresh QEMU boots the same disk. A reset inside the running QEMU once took four minutes
        under TCG before the kernel started again; a fresh start takes seconds."""
        before = self.boot_id()
        console_seen = self.serial_log.stat().st_size
        started = time.monotonic()
        restarted = None
        with self.connect() as conn:
            # A timer in PID 1 reboots a second later, so this command returns before sshd stops;
            # otherwise the session can hang on a connection the rebooting guest never closes.
            remote.run(conn, "systemd-run --quiet --on-active=1 --timer-property=AccuracySec=100ms systemctl reboot")
        while self.is_running():
            now = time.monotonic()
            if restarted is None and RESTART_MESSAGE in self._console_since(console_seen):
                restarted = now
            if restarted is not None and now - restarted > RESET_SECONDS:
                self.kill()  # the kernel said it restarts, after systemd synced the disk: a reset it never made
                break
            if now - started > timeout:
                raise self._failure(f"did not restart within {timeout:.0f}s of `systemctl reboot`")
            time.sleep(SSH_POLL_SECONDS)
        if RESTART_MESSAGE not in self._console_since(console_seen):
            raise self._failure(f"stopped instead of rebooting (QEMU exit {self.process.returncode})")
        self.start()
        self.wait_for_ssh(max(1.0, timeout - (time.monotonic() - started)))
        if self.boot_id() == before:
            raise self._failure("answers SSH with the boot id it had before the reboot")
        return time.monotonic() - started

    def power_off(self, timeout: float = BOOT_SECONDS) -> None:
        """`systemctl poweroff` in the guest, then wait until QEMU exits: a clean shutdown, disk synced."""
        with self.connect() as conn:
            remote.run(conn, "systemd-run --quiet --on-active=1 --timer-property=AccuracySec=100ms systemctl poweroff")
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._failure(f"did not power off within {timeout:.0f}s of `systemctl poweroff`") from None
        _running.discard(self)

    def boot_kernel(self, tree: KernelTree, timeout: float = BOOT_SECONDS) -> float:
        """Power off, then boot TREE's kernel (QEMU's -kernel, with an initramfs made from TREE's
        modules) on the same disk, as a boot loader does after a kernel upgrade; returns the seconds
        until SSH answers."""
        release = validate_release(tree.release)
        if tree.modules_dir is None:
            raise ToaError(f"kernel {release} has no modules directory in the cache: fetch it again with toa.debian")
        initrd = self.workdir / f"{self.name}.{release}.initrd.gz"
        _build_initramfs(initrd, tree.modules_dir)
        if self.is_running():
            self.power_off()
        self.image = dataclasses.replace(self.image, release=release, vmlinuz=tree.vmlinuz, initrd=initrd)
        started = time.monotonic()
        self.start()
        self.wait_for_ssh(timeout)
        return time.monotonic() - started

    def _console_since(self, offset: int) -> str:
        return qemu.console_since(self.serial_log, offset)


def new_guests(images: list[GuestImage], workdir: Path, *, count: int | None = None,
               memory_mb: int = DEFAULT_MEMORY_MB) -> list[Guest]:
    """`count` guests (default: one per image) spread over the images in turn, not started."""
    count = len(images) if count is None else count
    if not images or count < 1:
        raise ToaError("a fleet needs at least one kernel image and one guest")
    # Hold every probe socket until all ports are chosen, so no two guests get the same one.
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((LOOPBACK, 0))
        ports = [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
    return [Guest(f"guest{index + 1}", images[index % len(images)], workdir, port, memory_mb=memory_mb)
            for index, port in enumerate(ports)]


@contextlib.contextmanager
def fleet(kernel_trees: list[KernelTree], workdir: Path, *, count: int | None = None, suite: str = DEFAULT_SUITE,
          memory_mb: int = DEFAULT_MEMORY_MB, boot_timeout: float | None = None,
          progress: Callable[[str], None] | None = None, extra_packages: tuple[str, ...] = ()) -> Iterator[list[Guest]]:
    """Boot `count` guests (default: one per kernel) at once and wait for their sshd; kill them all on exit.

    boot_timeout defaults to BOOT_SECONDS plus BOOT_SECONDS_PER_GUEST for each guest: they share the
    host's cores, so a larger fleet takes longer to come up."""
    images = [guest_image(tree, suite=suite, progress=progress, extra_packages=extra_packages) for tree in kernel_trees]
    guests = new_guests(images, Path(workdir), count=count, memory_mb=memory_mb)
    if boot_timeout is None:
        boot_timeout = BOOT_SECONDS + BOOT_SECONDS_PER_GUEST * len(guests)
    try:
        for guest in guests:
            _say(progress, f"booting {guest.name} ({guest.release}) on port {guest.port}")
            guest.start()
        deadline = time.monotonic() + boot_timeout
        for guest in guests:
            guest.wait_for_ssh(max(1.0, deadline - time.monotonic()))
            _say(progress, f"{guest.name} answers SSH")
        yield guests
    finally:
        for guest in guests:
            guest.kill()
