"""Fleet-host guests: real Debian kernels booting a real Debian userland (systemd, sshd) under QEMU.

Every check goes over real SSH (toa.remote, host keys checked) into real TCG guests: two kernels at
once, a power cut and restart, a reboot through the guest's own systemd, and guests that cannot boot
failing with their console.
"""

from __future__ import annotations

import gzip
import time

import pytest

from toa import guests, qemu, remote
from toa.debian import KernelTree
from toa.errors import ToaError


MARKER = "/var/lib/toa-guest-marker"


@pytest.fixture(scope="module")
def two_guests(guest_kernels, tmp_path_factory):
    """One guest per kernel (two different Debian kernels), booted at once."""
    workdir = tmp_path_factory.mktemp("guests")
    started = time.monotonic()
    with guests.fleet(guest_kernels, workdir) as fleet:
        print(f"\n{len(fleet)} guests answer SSH after {time.monotonic() - started:.1f}s")
        yield fleet


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_guests_boot_their_own_kernel_under_systemd(two_guests, guest_kernels):
    assert {guest.release for guest in two_guests} == {tree.release for tree in guest_kernels}
    assert len({guest.port for guest in two_guests}) == len(two_guests)
    for guest in two_guests:
        assert guest.node_line() == f"root@127.0.0.1:{guest.port}"
        spec = remote.parse_host(guest.node_line())
        with remote.connect(spec, guest.ssh_options()) as conn:
            assert remote.run(conn, "uname -r").strip() == guest.release
            assert remote.run(conn, "cat /proc/1/comm").strip() == "systemd"
            assert remote.run(conn, "hostname").strip() == guest.name
            assert remote.run(conn, "cat /etc/machine-id").strip() == guest.machine_id
            # What deploys rely on: depmod works and the module tree's extra/ is writable.
            remote.run(conn, f"touch /lib/modules/{guest.release}/extra/probe && depmod -a && modprobe tun")
            assert "tun" in remote.run(conn, "cut -d' ' -f1 /proc/modules").split()


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_guests_have_a_sudo_user_and_python(two_guests):
    guest = two_guests[0]
    assert guest.run("sudo -n id -u", user=guests.SUDO_USER).strip() == "0"
    assert guest.run("id -u", user=guests.SUDO_USER).strip() != "0"
    assert guest.run("python3 -c 'import json, sys; print(sys.version_info[0])'").strip() == "3"


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_a_guest_with_an_unknown_host_key_is_refused(two_guests, tmp_path):
    guest = two_guests[0]
    stranger = tmp_path / "known_hosts"
    # A valid ed25519 key that is not the guest's.
    stranger.write_text(f"[127.0.0.1]:{guest.port} ssh-ed25519 "
                        "AAAAC3NzaC1lZDI1NTE5AAAAIHJ1B6QH7CXGF2gxb0nXa1+t0mFQ3Rzm8Cj2zqKg1Uxd\n")
    options = remote.SshOptions(key_filename=str(guest.key_path), known_hosts=str(stranger))
    with pytest.raises(ToaError, match="does not match known_hosts"):
        remote.connect(remote.parse_host(guest.node_line()), options)


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_a_killed_guest_restarts_with_its_disk_intact(two_guests):
    guest = two_guests[1]
    guest.run(f"echo survived > {MARKER} && sync")
    before = guest.boot_id()
    guest.kill()
    assert not guest.is_running()
    guest.start()
    waited = guest.wait_for_ssh()
    print(f"\n{guest.name} ({guest.release}) back after a power cut in {waited:.1f}s")
    assert guest.boot_id() != before
    assert guest.run(f"cat {MARKER}").strip() == "survived"
    assert guest.run("uname -r").strip() == guest.release
    # The power cut left the root file system's journal to replay at the next mount.
    assert "recovery complete" in guest.run("dmesg | grep -i 'EXT4-fs (vda)' || true")


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_systemctl_reboot_comes_back_on_the_same_kernel(two_guests):
    guest = two_guests[0]
    qemu = guest.process
    # What deploys rely on for autoload: the distro's systemd-modules-load reads modules-load.d at boot.
    guest.run("echo tun > /etc/modules-load.d/guest-test.conf && modprobe -r tun")
    before = guest.boot_id()
    seconds = guest.reboot()
    print(f"\n{guest.name} ({guest.release}) rebooted to SSH in {seconds:.1f}s")
    # The guest asked for its own reset (QEMU's -no-reboot exit is 0; a kill is -9) and a new QEMU booted.
    assert qemu.returncode == 0 and guest.process is not qemu and guest.is_running()
    assert guest.boot_id() != before
    assert guest.run("uname -r").strip() == guest.release
    assert guest.run("cat /proc/1/comm").strip() == "systemd"
    assert "tun" in guest.run("cut -d' ' -f1 /proc/modules").split()


def test_guest_names_and_kernels_without_modules_are_refused(tmp_path):
    tree = KernelTree("6.1.0-56-amd64", "bookworm", tmp_path / "vmlinuz", None, tmp_path)
    with pytest.raises(ToaError, match="no modules directory"):
        guests.guest_image(tree)
    image = guests.GuestImage("6.1.0-56-amd64", tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "disk",
                              tmp_path / "key", "ssh-ed25519 AAAA")
    with pytest.raises(ToaError, match="invalid guest name"):
        guests.Guest("x; reboot", image, tmp_path, 2222)


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_a_guest_that_cannot_mount_its_disk_fails_with_its_console(guest_kernels, tmp_path):
    image = guests.guest_image(guest_kernels[0])
    blank = tmp_path / "blank.raw"
    with blank.open("wb") as disk:
        disk.truncate(64 << 20)  # no file system on it
    unbootable = guests.GuestImage(image.release, image.vmlinuz, image.initrd, blank, image.client_key,
                                   image.host_key)
    guest = guests.new_guests([unbootable], tmp_path)[0]
    guest.start()
    try:
        with pytest.raises(ToaError, match="guest1 .* stopped before sshd answered.*cannot mount /dev/vda"):
            guest.wait_for_ssh(timeout=120)
    finally:
        guest.kill()


@pytest.mark.lab
@pytest.mark.ssh
@pytest.mark.network
def test_a_guest_whose_kernel_panics_fails_fast_with_the_panic(guest_kernels, tmp_path):
    image = guests.guest_image(guest_kernels[0])
    # An initramfs without /init: the kernel cannot mount a root it has no drivers for, and panics.
    empty = tmp_path / "empty.cpio.gz"
    empty.write_bytes(gzip.compress(qemu.Cpio().finish()))
    panicking = guests.GuestImage(image.release, image.vmlinuz, empty, image.disk, image.client_key, image.host_key)
    guest = guests.new_guests([panicking], tmp_path)[0]
    guest.start()
    started = time.monotonic()
    try:
        with pytest.raises(ToaError, match="kernel panicked before sshd answered.*Kernel panic - not syncing"):
            guest.wait_for_ssh(timeout=120)
        assert time.monotonic() - started < 90
    finally:
        guest.kill()


def test_a_userland_with_extra_packages_is_its_own_recipe_and_names_are_checked():
    plain = guests._userland_dir("bookworm")
    assert plain == guests._userland_dir("bookworm", ())
    assert guests._userland_dir("bookworm", guests.BUILD_HOST_PACKAGES) not in (plain, guests._userland_dir("bullseye"))
    for bad in ("gcc;reboot", "-o", "GCC", ""):
        with pytest.raises(ToaError, match="invalid package name"):
            guests.userland("bookworm", extra_packages=("make", bad))


def test_a_slow_banner_is_waited_for_not_abandoned(monkeypatch):
    """A loaded guest's sshd may take longer for its banner than probes are opened apart: the probe
    stays open (its work in the guest is not wasted), while a port that hangs up gets new probes.
    Real sockets on loopback; sshd is a listener that answers only the first connection, late."""
    import socket
    import threading

    monkeypatch.setattr(guests, "CONNECT_INTERVAL_SECONDS", 0.05)
    listener = socket.create_server((guests.LOOPBACK, 0))
    port = listener.getsockname()[1]
    accepted = []

    def serve() -> None:
        first, _ = listener.accept()
        accepted.append(first)
        listener.settimeout(0.1)
        deadline = time.monotonic() + 1.0  # later probes are accepted and hung up on meanwhile
        while time.monotonic() < deadline:
            try:
                other, _ = listener.accept()
                accepted.append(other)
                other.close()
            except TimeoutError:
                pass
        first.sendall(b"SSH-2.0-slow\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    checks = []
    try:
        assert guests._ssh_banner_within(port, 10.0, lambda: checks.append(1))
    finally:
        server.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert len(accepted) > 4  # new probes kept coming while the first one waited
    assert checks  # the guest was checked while waiting


def test_a_guest_that_dies_ends_the_wait(monkeypatch):
    """CHECK raising (QEMU exited, the kernel panicked) ends the wait at once."""
    def dead() -> None:
        raise ToaError("guest stopped")

    with pytest.raises(ToaError, match="guest stopped"):
        guests._ssh_banner_within(guests.free_port(), 30.0, dead)
