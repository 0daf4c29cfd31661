"""Shared pytest fixtures and the markers that say what a test needs.

Markers: `network` (the Debian mirror), `docker` (a Docker engine), `ssh` (a real sshd on loopback), `lab`
(QEMU boots of real kernels). A test with none of them is `pure`: it is given no way out (no Docker
engine, no QEMU, sshd, ssh, apt-get or debootstrap on PATH, no connection beyond loopback), so a test that
needs more than it says fails instead of passing by luck. `invoke test --fast` runs the pure tests, in a
network namespace of their own where `unshare` allows it.

`sshd` runs a real OpenSSH server on loopback so that code which talks SSH is
tested against the real protocol, real host-key checks and real key auth.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SSHD_BINARY = Path("/usr/sbin/sshd")
# sshd refuses to start without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 10.0
START_ATTEMPTS = 3


NEEDS = ("network", "docker", "ssh", "lab")
# What a pure test may not start: each stands for something a marker names.
FORBIDDEN_TOOLS = ("qemu-system-x86_64", "docker", "dockerd", "sshd", "ssh", "scp", "apt-get", "debootstrap")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in NEEDS):
            item.add_marker(pytest.mark.pure)


@pytest.fixture(scope="session")
def _forbidden_tools_dir(tmp_path_factory) -> Path:
    """Stand-ins for FORBIDDEN_TOOLS that fail loudly, first on a pure test's PATH."""
    bin_dir = tmp_path_factory.mktemp("pure-bin")
    for tool in FORBIDDEN_TOOLS:
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\necho 'a pure test ran {tool}: mark the test with what it needs' >&2\nexit 127\n")
        stub.chmod(0o755)
    return bin_dir


@pytest.fixture(autouse=True)
def _pure_tests_stay_pure(request, monkeypatch):
    """A pure test (no marker of NEEDS) gets no Docker engine, no tools of FORBIDDEN_TOOLS and no
    connection beyond loopback; the environment carries the first two into the processes it starts."""
    if request.node.get_closest_marker("pure") is None:
        return
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/pure-test/docker.sock")
    monkeypatch.setenv("PATH", f"{request.getfixturevalue('_forbidden_tools_dir')}{os.pathsep}{os.environ['PATH']}")
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse_beyond_loopback(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            raise AssertionError(f"a pure test connected to {address!r}: mark it network")

    def connect(sock, address):
        refuse_beyond_loopback(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        refuse_beyond_loopback(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class SshServer:
    """Where and how to reach the test sshd."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path


def _write_ed25519_key_pair(private_path: Path) -> str:
    """Write an unencrypted OpenSSH ed25519 private key; return the public key line."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private_path.chmod(0o600)  # ssh and sshd both refuse group/world-readable keys
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    private_path.with_name(private_path.name + ".pub").write_text(public_line + "\n")
    return public_line


def _unused_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _sshd_config(workdir: Path, port: int) -> str:
    return "\n".join(
        [
            f"ListenAddress {LOOPBACK}:{port}",
            f"HostKey {workdir / 'ssh_host_ed25519_key'}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            # The files live in a world-traversable temp dir, which StrictModes rejects.
            "StrictModes no",
            "UsePAM no",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


def _await_banner(process: subprocess.Popen, port: int, log_path: Path) -> bool:
    """True once sshd answers with its SSH banner; False if it exited first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0) as conn:
                if conn.recv(256).startswith(b"SSH-2.0-"):
                    return True
        except OSError:
            time.sleep(0.1)
    _stop(process)
    raise RuntimeError(
        f"sshd on port {port} sent no banner within {STARTUP_TIMEOUT_SECONDS}s; "
        f"log:\n{log_path.read_text()}"
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real OpenSSH server on 127.0.0.1 that accepts one client key for the current user."""
    if not SSHD_BINARY.exists():
        pytest.skip(f"{SSHD_BINARY} is absent: install the openssh-server package")

    workdir = tmp_path_factory.mktemp("sshd")
    host_public = _write_ed25519_key_pair(workdir / "ssh_host_ed25519_key")
    client_public = _write_ed25519_key_pair(workdir / "client_ed25519")
    (workdir / "authorized_keys").write_text(client_public + "\n")
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    log_path = workdir / "sshd.log"
    # The free port is only reserved until it is closed; retry if another process wins it.
    for _attempt in range(START_ATTEMPTS):
        port = _unused_loopback_port()
        config_path = workdir / "sshd_config"
        config_path.write_text(_sshd_config(workdir, port))
        with log_path.open("w") as log:
            # -D: stay in the foreground so the fixture owns the process; -e: log to stderr.
            process = subprocess.Popen(
                [str(SSHD_BINARY), "-D", "-e", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if _await_banner(process, port, log_path):
            break
    else:
        raise RuntimeError(f"sshd did not start after {START_ATTEMPTS} attempts; log:\n{log_path.read_text()}")

    known_hosts_path = workdir / "known_hosts"
    known_hosts_path.write_text(f"[{LOOPBACK}]:{port} {host_public}\n")
    try:
        yield SshServer(
            host=LOOPBACK,
            port=port,
            user=getpass.getuser(),
            key_path=workdir / "client_ed25519",
            known_hosts_path=known_hosts_path,
        )
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def guest_kernels():
    """Two different real Debian kernels for QEMU guests (the newest of bookworm and of bullseye),
    fetched into the cache: toa.guests boots them as fleet hosts."""
    from toa import debian

    return [debian.prepare(None, suite)[1] for suite in ("bookworm", "bullseye")]
