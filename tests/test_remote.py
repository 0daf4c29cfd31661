"""Detection over SSH against a real sshd on loopback, with real host-key checking."""

import os

import pytest

from tests.cli import assert_one_line_error, json_items, toa
from toa.errors import ToaError
from toa.remote import HostSpec, parse_host


@pytest.mark.parametrize(
    "text, expected",
    [
        ("node1", HostSpec("node1")),
        ("root@10.0.0.5", HostSpec("10.0.0.5", "root")),
        ("deploy@web-01.example.com:2222", HostSpec("web-01.example.com", "deploy", 2222)),
        ("[fd00::5]:2200", HostSpec("fd00::5", None, 2200)),
        ("ops@[::1]", HostSpec("::1", "ops")),
        ("[fe80::5%eth0.100]:22", HostSpec("fe80::5%eth0.100", None, 22)),
    ],
)
def test_host_specs_parse(text, expected):
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "a;b", "host$(id)", "`id`", "a b", "root@", "@host", "host:0", "host:70000", "-oProxyCommand=x",
     "user@host@x", "[not-v6]:22", "h/../x", "host\nx", "a" * 300, "us;er@host",
     "[fe80::5%$(reboot)]", "[fe80::5%a b]", "[fe80::5%x;y]", "[fe80::5%]", "[fe80::5%abcdefghijklmnop]",
     "[fe80::5%eth0%eth1]"],
)
def test_hostile_host_specs_are_rejected(text):
    with pytest.raises(ToaError, match="invalid host"):
        parse_host(text)


def _ssh_args(sshd, *extra):
    return ["--host", f"{sshd.user}@{sshd.host}:{sshd.port}", "--key", str(sshd.key_path), *extra]


@pytest.mark.ssh
def test_detect_over_ssh_reads_the_real_host(sshd):
    result = toa("detect", *_ssh_args(sshd, "--known-hosts", str(sshd.known_hosts_path), "--json"))
    assert result.returncode == 0, result.stderr
    [info] = json_items(result, "detect")
    [local] = json_items(toa("detect", "--json"), "detect")
    assert info["kernel"] == os.uname().release
    assert {k: info[k] for k in ("family", "distro", "version", "target")} == {
        k: local[k] for k in ("family", "distro", "version", "target")
    }
    assert info["family"] and info["target"]


@pytest.mark.ssh
def test_unknown_host_key_is_refused(sshd):
    result = toa("detect", *_ssh_args(sshd))
    assert_one_line_error(result, "host key", "unknown", "--known-hosts")


@pytest.mark.ssh
def test_changed_host_key_is_refused(sshd, tmp_path):
    other = tmp_path / "known_hosts"
    # a valid ed25519 key that is not the server's
    other.write_text(
        f"[{sshd.host}]:{sshd.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIGZ0b2EtdGVzdC1rZXktdGhhdC1pcy1ub3QtdGhlLXNlcnZl\n"
    )
    result = toa("detect", *_ssh_args(sshd, "--known-hosts", str(other)))
    assert_one_line_error(result, "does not match")


@pytest.mark.ssh
def test_host_key_check_opt_out(sshd):
    result = toa("detect", *_ssh_args(sshd, "--no-host-key-check", "--json"))
    assert result.returncode == 0, result.stderr
    assert json_items(result, "detect")[0]["kernel"] == os.uname().release


@pytest.mark.ssh
def test_unreachable_port_is_one_line(sshd):
    result = toa("detect", "--host", f"{sshd.host}:1", "--no-host-key-check")
    assert_one_line_error(result, "cannot reach")


@pytest.mark.ssh
def test_ssh_config_fills_in_what_the_host_spec_leaves_open(sshd, tmp_path):
    """A host given by its ssh_config alias, without a port: HostName, Port and User come from
    ~/.ssh/config, as with OpenSSH; a failure names the effective target."""
    import getpass

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host toa-test-alias\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n"
        "Host toa-test-dead\n  HostName 127.0.0.1\n  Port 1\n")
    env = {**os.environ, "HOME": str(home)}
    args = ["--key", str(sshd.key_path), "--known-hosts", str(sshd.known_hosts_path), "--json"]
    result = toa("detect", "--host", "toa-test-alias", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert json_items(result, "detect")[0]["kernel"] == os.uname().release
    failed = toa("detect", "--host", "toa-test-dead", *args[:-1], env=env)
    assert_one_line_error(failed, f"cannot reach {getpass.getuser()}@127.0.0.1:1 "
                                  "(toa-test-dead in ssh_config)")


def _key_of(known_hosts_line: str) -> str:
    return " ".join(known_hosts_line.split()[1:3])


@pytest.mark.ssh
def test_known_hosts_as_openssh_writes_it_never_crashes(sshd, tmp_path):
    """@cert-authority lines, key types paramiko lacks (sk-*) and damaged lines are skipped with one
    warning; the host's own line still checks its key."""
    entry = sshd.known_hosts_path.read_text().strip()
    known = tmp_path / "known_hosts"
    known.write_text("\n".join([
        f"@cert-authority *.example.com {_key_of(entry)}",
        "host.example sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIJ1k9rmI0bWl7nB8y5Lx1cYx"
        "XoB7r7y7sCqYj6lU0zqSAAAABHNzaDo=",
        "damaged.example ssh-ed25519 not-base64!",
        "# a comment", "", entry, ""]))
    result = toa("detect", "--host", f"{sshd.user}@{sshd.host}:{sshd.port}", "--key", str(sshd.key_path),
                 "--known-hosts", str(known), "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"toa: warning: {known}: skipped 3 line(s) toa cannot check against "
                                     "(@cert-authority, unsupported key types or damaged lines)")


@pytest.mark.ssh
def test_a_revoked_host_key_is_refused(sshd, tmp_path):
    entry = sshd.known_hosts_path.read_text().strip()
    known = tmp_path / "known_hosts"
    known.write_text(f"{entry}\n@revoked * {_key_of(entry)}\n")
    result = toa("detect", "--host", f"{sshd.user}@{sshd.host}:{sshd.port}", "--key", str(sshd.key_path),
                 "--known-hosts", str(known))
    assert_one_line_error(result, "is listed under @revoked in known_hosts")


def _spec(sshd):
    return HostSpec(sshd.host, sshd.user, sshd.port)


@pytest.mark.ssh
def test_accept_new_records_the_key_then_checks_it(sshd, tmp_path):
    from toa.remote import SshOptions, connect

    recorded = tmp_path / "new" / "known_hosts"
    options = SshOptions(key_filename=str(sshd.key_path), known_hosts=str(recorded), accept_new_host_keys=True)
    connect(_spec(sshd), options).close()
    line = recorded.read_text()
    assert line == sshd.known_hosts_path.read_text(), line
    # now known: a connection that accepts nothing new goes through
    connect(_spec(sshd), SshOptions(key_filename=str(sshd.key_path), known_hosts=str(recorded))).close()


@pytest.mark.ssh
def test_accept_new_still_refuses_a_changed_key(sshd, tmp_path):
    from toa.remote import SshOptions, connect

    other = tmp_path / "known_hosts"
    other.write_text(
        f"[{sshd.host}]:{sshd.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIGZ0b2EtdGVzdC1rZXktdGhhdC1pcy1ub3QtdGhlLXNlcnZl\n"
    )
    before = other.read_text()
    options = SshOptions(key_filename=str(sshd.key_path), known_hosts=str(other), accept_new_host_keys=True)
    with pytest.raises(ToaError, match="does not match"):
        connect(_spec(sshd), options)
    assert other.read_text() == before


@pytest.mark.ssh
def test_a_command_past_the_time_limit_is_a_lost_connection(sshd):
    import time

    from toa.remote import ConnectionLost, SshOptions, connect, limit, run

    with connect(_spec(sshd), SshOptions(key_filename=str(sshd.key_path), known_hosts=str(sshd.known_hosts_path))) as conn:
        limit(conn, 2)
        assert run(conn, "echo hello").strip() == "hello"
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match=r"^no answer from 127\.0\.0\.1 within 2 s \(sleeping\)"):
            run(conn, "sleep 30", "sleeping")
        assert time.monotonic() - started < 15


@pytest.mark.ssh
def test_a_host_gone_silent_between_commands_is_noticed_within_the_limit(sshd):
    """The sshd process serving the session is stopped (SIGSTOP): the TCP peer stays open and says
    nothing, so the next command waits for its channel, which invoke's own timer does not cover."""
    import signal
    import time

    from toa.remote import WATCHDOG_GRACE_SECONDS, ConnectionLost, SshOptions, connect, limit, run

    with connect(_spec(sshd), SshOptions(key_filename=str(sshd.key_path), known_hosts=str(sshd.known_hosts_path))) as conn:
        limit(conn, 2)
        session = int(run(conn, "echo $PPID"))  # the sshd process that carries this connection
        os.kill(session, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match=r"^no answer from 127\.0\.0\.1 within 2 s \(a command\)"):
                run(conn, "true")
            assert time.monotonic() - started < 2 + WATCHDOG_GRACE_SECONDS + 10
        finally:
            os.kill(session, signal.SIGCONT)


@pytest.mark.ssh
def test_a_session_answers_twice_on_one_channel(sshd):
    """remote.Session over real sshd: the first part up to the mark (a mark inside a line is not
    one), then the rest after more input; a command that ends before the mark is over at once;
    one that is left waiting ends when closed. The first part is bounded by the time limit."""
    from toa.remote import ConnectionLost, Session, SshOptions, connect, limit

    with connect(_spec(sshd), SshOptions(key_filename=str(sshd.key_path), known_hosts=str(sshd.known_hosts_path))) as conn:
        limit(conn, 5)
        command = "sh -c 'echo one; echo not @@m; printf \"\\n@@m\\n\"; IFS= read -r l; echo \"got $l\"; cat; exit 3'"
        session = Session(conn, command, "@@m", "talking")
        assert session.first == "one\nnot @@m\n" and session.waiting and session.ended is None
        lines = []
        result = session.finish(b"line\nrest\n", "answering", lines.append)
        assert (result.stdout, result.exited, lines) == ("got line\nrest\n", 3, ["got line", "rest"])
        assert not session.waiting

        ended = Session(conn, "sh -c 'echo only; echo why >&2; exit 4'", "@@m", "talking")
        assert not ended.waiting and ended.first == "only\n"
        assert (ended.ended.exited, ended.ended.stderr) == (4, "why\n")

        waiting = Session(conn, "sh -c 'printf \"@@m\\n\"; read l; echo never'", "@@m", "talking")
        assert waiting.first == "" and waiting.waiting
        waiting.close()
        assert not waiting.waiting

        with pytest.raises(ConnectionLost, match=r"within 5 s \(talking\)"):
            Session(conn, "sleep 30", "@@m", "talking")
