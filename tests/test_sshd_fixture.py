"""The `sshd` fixture is a real OpenSSH server: key login works, host keys are checked."""

from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

pytestmark = pytest.mark.ssh


def _strict_client(known_hosts_path: Path) -> paramiko.SSHClient:
    """A client that trusts only the given known_hosts file and rejects anything else."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _connect(client: paramiko.SSHClient, sshd, key_path: Path) -> None:
    client.connect(
        sshd.host,
        port=sshd.port,
        username=sshd.user,
        key_filename=str(key_path),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )


def _other_ed25519_public_line() -> str:
    return (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def test_key_login_runs_a_remote_command(sshd):
    client = _strict_client(sshd.known_hosts_path)
    try:
        _connect(client, sshd, sshd.key_path)
        _stdin, stdout, _stderr = client.exec_command("cat /etc/os-release", timeout=10)
        output = stdout.read().decode()
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()
    assert output == Path("/etc/os-release").read_text()


def test_known_hosts_uses_bracketed_host_port_form(sshd):
    line = sshd.known_hosts_path.read_text().strip()
    assert line.startswith(f"[{sshd.host}]:{sshd.port} ssh-ed25519 ")


def test_mismatched_host_key_is_rejected(sshd, tmp_path):
    wrong_known_hosts = tmp_path / "known_hosts"
    wrong_known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {_other_ed25519_public_line()}\n")
    client = _strict_client(wrong_known_hosts)
    try:
        with pytest.raises(paramiko.BadHostKeyException):
            _connect(client, sshd, sshd.key_path)
    finally:
        client.close()


def test_unknown_host_is_rejected(sshd, tmp_path):
    empty_known_hosts = tmp_path / "known_hosts"
    empty_known_hosts.write_text("")
    client = _strict_client(empty_known_hosts)
    try:
        with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
            _connect(client, sshd, sshd.key_path)
    finally:
        client.close()


def test_unauthorized_client_key_is_refused(sshd, tmp_path):
    stranger_key = tmp_path / "stranger_ed25519"
    stranger_key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    stranger_key.chmod(0o600)
    client = _strict_client(sshd.known_hosts_path)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            _connect(client, sshd, stranger_key)
    finally:
        client.close()
