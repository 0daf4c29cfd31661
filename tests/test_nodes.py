"""The nodes.txt inventory parser: pure, and strict about every line before any host is contacted."""

from pathlib import Path

import pytest

from toa.errors import ToaError
from toa.nodes import Node, load, parse
from toa.remote import HostSpec


def test_hosts_settings_and_comments(tmp_path):
    key = tmp_path / "keys" / "web_ed25519"
    key.parent.mkdir()
    key.write_text("not read by the parser\n")
    text = (
        "# web tier\n"
        "\n"
        "root@10.0.0.5\n"
        "deploy@web-01.example.com:2222  key=keys/web_ed25519\tsudo=yes   # second\n"
        "[fd00::7]:22 user=ops sudo=no\r\n"
        f"node4 key={key}\n"
    )
    assert parse(text, "nodes.txt", tmp_path) == [
        Node(HostSpec("10.0.0.5", "root"), line=3),  # no port: ssh_config's, else 22
        Node(HostSpec("web-01.example.com", "deploy", 2222), key=key, sudo=True, line=4),
        Node(HostSpec("fd00::7", "ops", 22), sudo=False, line=5),
        Node(HostSpec("node4"), key=key, line=6),
    ]


def test_load_names_the_file_and_line(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("good-host\n# fine\nhost;rm -rf /\n")
    with pytest.raises(ToaError, match=rf"^{nodes}:3: invalid host 'host;rm"):
        load(nodes)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("host;rm -rf /", "invalid host"),
        ("$(id)", "invalid host"),
        ("`id`", "invalid host"),
        ("host$(id):22", "invalid host"),
        ("host|nc evil 1", "invalid host"),
        ("host:0", "invalid host"),
        ("host:70000", "invalid host"),
        ("host:-1", "invalid host"),
        ("host:22x", "invalid host"),
        ("user@@host", "invalid host"),
        ("-oProxyCommand=sh", "invalid host"),
        ("host name", "unexpected 'name'"),
        ("host sudo=maybe", "sudo=yes or sudo=no"),
        ("host sudo=yes sudo=no", "given twice"),
        ("host user=$(id)", "not a valid user name"),
        ("root@host user=ops", "user given twice"),
        ("host key=/no/such/key", "does not exist"),
        ("host port=22", "unexpected 'port=22'"),
        ("host KEY=x", "unexpected"),
        ("host\x1b[2Jx", "control characters"),
        ("host\vx", "control characters"),
    ],
)
def test_hostile_or_bad_lines_are_rejected(line, fragment, tmp_path):
    with pytest.raises(ToaError) as error:
        parse(f"ok-host\n{line}\n", "nodes.txt", tmp_path)
    message = str(error.value)
    assert message.startswith("nodes.txt:2: "), message
    assert fragment in message
    assert "\n" not in message


def test_each_host_once(tmp_path):
    with pytest.raises(ToaError, match=r"nodes.txt:3: .*already listed on line 1"):
        parse("a.example:2222\nb.example\nroot@A.example:2222\n", "nodes.txt", tmp_path)


def test_empty_inventory_and_missing_file(tmp_path):
    with pytest.raises(ToaError, match="lists no hosts"):
        parse("# nothing\n\n", "nodes.txt", tmp_path)
    with pytest.raises(ToaError, match="not found: fix --hosts"):
        load(tmp_path / "absent.txt")


def test_relative_key_is_relative_to_the_nodes_file(tmp_path, monkeypatch):
    (tmp_path / "k").write_text("")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("host key=k\n")
    assert load(nodes)[0].key == tmp_path / "k"
    assert Path("k").exists() is False
