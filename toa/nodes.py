"""The inventory: a nodes.txt file listing the hosts to deploy to.

One host per line as `[user@]host[:port]`, then optional settings:

    # web tier
    root@10.0.0.5
    deploy@web-01.example.com:2222  key=keys/web_ed25519  sudo=yes
    [fd00::7]:22  user=ops  sudo=no   # IPv6

Settings: `key=PATH` (private key; relative to the nodes file), `sudo=yes|no` (may a user other than
root run `sudo -n`; default yes), `user=NAME` (same as `NAME@host`). `#` starts a comment. Words are
split on whitespace and never unquoted, so a path with spaces cannot be given. Every line is checked
before any host is contacted; an error names the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from toa.errors import ToaError
from toa.remote import USER_PATTERN, HostSpec, parse_host

SETTINGS = ("key", "sudo", "user")
_SETTING = re.compile(r"(?P<name>[a-z]+)=(?P<value>.*)")
# Printable characters only: a key path goes to the SSH library, never to a shell, but control
# characters in it can only be a mistake or an attack.
_PATH = re.compile(r"[\x21-\x7e]{1,4096}")


@dataclass(frozen=True)
class Node:
    spec: HostSpec
    key: Path | None = None
    sudo: bool = True
    line: int = 0

    @property
    def name(self) -> str:
        return str(self.spec)


def _setting_error(where: str, message: str) -> ToaError:
    return ToaError(f"{where}: {message}")


def parse_line(text: str, where: str, base: Path) -> Node | None:
    """One nodes.txt line; None for a blank or comment line. WHERE is `file:line` for errors,
    BASE the directory relative key paths start from. Pure apart from checking that a key exists."""
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", text):
        raise _setting_error(where, "control characters in the line: remove them")
    words = text.split("#", 1)[0].split()
    if not words:
        return None
    try:
        spec = parse_host(words[0])
    except ToaError as exc:
        raise _setting_error(where, str(exc)) from None
    node = Node(spec=spec)
    seen = set()
    for word in words[1:]:
        match = _SETTING.fullmatch(word)
        if not match or match["name"] not in SETTINGS:
            raise _setting_error(
                where, f"unexpected {word[:60]!r} after the host: settings are {', '.join(s + '=' for s in SETTINGS)}"
            )
        name, value = match["name"], match["value"]
        if name in seen:
            raise _setting_error(where, f"{name}= given twice: keep one")
        seen.add(name)
        if name == "sudo":
            if value not in ("yes", "no"):
                raise _setting_error(where, f"sudo={value[:20]!r}: write sudo=yes or sudo=no")
            node = replace(node, sudo=value == "yes")
        elif name == "user":
            if not USER_PATTERN.fullmatch(value):
                raise _setting_error(where, f"user={value[:40]!r} is not a valid user name: use letters, digits, _ . -")
            if spec.user is not None:
                raise _setting_error(where, f"user given twice ({spec.user}@ and user=): keep one")
            node = replace(node, spec=replace(spec, user=value))
        else:
            if not _PATH.fullmatch(value):
                raise _setting_error(where, f"key={value[:40]!r} is not a usable path: printable characters, no spaces")
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise _setting_error(where, f"key file {path} does not exist: fix key=")
            node = replace(node, key=path)
    return node


def parse(text: str, source: str = "nodes.txt", base: Path = Path(".")) -> list[Node]:
    """All nodes of a nodes file's TEXT, every line checked; SOURCE names the file in errors."""
    nodes: list[Node] = []
    first_line: dict[tuple[str, int], int] = {}
    # split on newlines only: str.splitlines would also break at \v, \f and friends and hide them
    for number, line in enumerate(text.split("\n"), start=1):
        node = parse_line(line.removesuffix("\r"), f"{source}:{number}", base)
        if node is None:
            continue
        address = (node.spec.host.lower(), node.spec.port or 22)
        if address in first_line:
            raise ToaError(
                f"{source}:{number}: {node.spec.host}:{address[1]} is already listed on line "
                f"{first_line[address]}: list each host once"
            )
        first_line[address] = number
        nodes.append(replace(node, line=number))
    if not nodes:
        raise ToaError(f"{source} lists no hosts: add one `[user@]host[:port]` per line")
    return nodes


def load(path: str | Path) -> list[Node]:
    """Read and check a nodes file."""
    if not path:
        raise ToaError("give --hosts FILE: a nodes file, one [user@]host[:port] per line")
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ToaError(f"nodes file {path} not found: fix --hosts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ToaError(f"cannot read nodes file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, str(path), path.parent)
