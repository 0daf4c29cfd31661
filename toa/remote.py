"""SSH to a host with Fabric: validated host specs and host-key checking on by default."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
import socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, ThreadException
from invoke.runners import Result

from toa.errors import ToaError

USER_PATTERN = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
# An interface name as Linux allows it (IFNAMSIZ - 1), in characters no shell or config file reads twice.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_SPEC = re.compile(r"(?:(?P<user>[^@]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\[\]]+))(?::(?P<port>\d{1,5}))?")


@dataclass(frozen=True)
class HostSpec:
    host: str
    user: str | None = None
    port: int | None = None  # None: ssh_config's Port for the host, else 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}{f':{self.port}' if self.port else ''}"


def parse_host(text: str) -> HostSpec:
    """Parse `[user@]host[:port]` (IPv6 as `[addr]:port`), rejecting anything else."""
    bad = ToaError(
        f"invalid host {text[:80]!r}: write it as [user@]host[:port], e.g. root@10.0.0.5:22 or [fd00::5]:2222"
    )
    match = _SPEC.fullmatch(text or "")
    if not match or len(text) > 300:
        raise bad
    user, port = match["user"], int(match["port"]) if match["port"] else None
    if user is not None and not USER_PATTERN.fullmatch(user):
        raise bad
    if port is not None and not 0 < port < 65536:
        raise bad
    host = match["v6"] or match["host"]
    if match["v6"]:
        address, percent, zone = host.partition("%")
        if percent and not _ZONE.fullmatch(zone):
            raise ToaError(f"invalid host {text[:80]!r}: an IPv6 zone is an interface name "
                           "([A-Za-z0-9_.-], at most 15), e.g. [fe80::5%eth0]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise bad from None
    elif not _HOSTNAME.fullmatch(host):
        raise bad
    return HostSpec(host=host, user=user, port=port)


@dataclass(frozen=True)
class SshOptions:
    """How to reach hosts: key file, extra known_hosts file, and the explicit opt-outs of host-key
    checks: accept_new_host_keys trusts a host seen for the first time and records its key (a
    changed key is still refused); check_host_key=False accepts any key."""

    key_filename: str | None = None
    known_hosts: str | None = None
    check_host_key: bool = True
    timeout: float = 15.0
    accept_new_host_keys: bool = False


# Connections to several hosts run in threads and may record new keys in the same file.
_KNOWN_HOSTS_LOCK = threading.Lock()


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust a host whose name is in no known_hosts file and append its key to PATH (OpenSSH's
    StrictHostKeyChecking=accept-new)."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        with _KNOWN_HOSTS_LOCK:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.path.open("a") as known_hosts:
                known_hosts.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            _remember_recorded(self.path, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)


@dataclass
class KnownHosts:
    """What toa takes from known_hosts files as OpenSSH writes them: the plain entries, the keys listed
    under @revoked (refused for any host), and how many lines it cannot use (@cert-authority,
    key types paramiko lacks, damaged lines), which are skipped."""

    entries: list[paramiko.hostkeys.HostKeyEntry]
    revoked: list[paramiko.PKey]
    skipped: int = 0


def read_known_hosts(text: str) -> KnownHosts:
    known = KnownHosts([], [])
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        revoked = False
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            revoked = marker == "@revoked"
            if not revoked:  # @cert-authority: host certificates are not checked by toa
                known.skipped += 1
                continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip(), number)
        except (paramiko.hostkeys.InvalidHostKey, ValueError, IndexError):
            entry = None
        if entry is None:  # unknown key type (sk-*, ...) or a damaged line
            known.skipped += 1
        elif revoked:
            known.revoked.append(entry.key)
        else:
            known.entries.append(entry)
    return known


_WARNED: set[str] = set()


@dataclass
class _HostKeyIndex:
    """A known_hosts file read once: its plain host names indexed, its hashed ones (|1|...) in a list,
    its revoked keys. SIGNATURE is the file's (inode, size, mtime) when read."""

    signature: tuple
    plain: dict[str, list[paramiko.hostkeys.HostKeyEntry]]
    hashed: list[paramiko.hostkeys.HostKeyEntry]
    revoked: list[paramiko.PKey]

    def entries_for(self, name: str) -> list[paramiko.hostkeys.HostKeyEntry]:
        """The entries that name NAME as paramiko's own lookup matches them (exact or hashed)."""
        found = list(self.plain.get(name, ()))
        for entry in self.hashed:
            if any(host.startswith("|1|") and hmac.compare_digest(
                    paramiko.HostKeys.hash_host(name, host), host) for host in entry.hostnames):
                found.append(entry)
        return found


# Each known_hosts file is parsed once per content, not once per host: with 10,000 hosts, each of
# 10,000 connections would otherwise parse and load a 10,000-line file (quadratic in the fleet).
_INDEXES: dict[str, _HostKeyIndex] = {}


def _signature(path: Path) -> tuple:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def _index(path: Path) -> _HostKeyIndex:
    """PATH's known_hosts entries, read again only when the file changed. Lines toa cannot use
    are skipped with one warning per file (paramiko's own reader stops at them with a traceback)."""
    try:
        with _KNOWN_HOSTS_LOCK:
            signature = _signature(path)
            index = _INDEXES.get(str(path))
            if index is not None and index.signature == signature:
                return index
            known = read_known_hosts(path.read_text(errors="replace"))
            index = _HostKeyIndex(signature, {}, [], known.revoked)
            for entry in known.entries:
                if any(host.startswith("|1|") for host in entry.hostnames):
                    index.hashed.append(entry)
                for host in entry.hostnames:
                    if not host.startswith("|1|"):
                        index.plain.setdefault(host, []).append(entry)
            _INDEXES[str(path)] = index
    except OSError as exc:
        raise ToaError(f"cannot read known_hosts file {path}: {exc.strerror}") from None
    if known.skipped and str(path) not in _WARNED:
        _WARNED.add(str(path))
        print(f"toa: warning: {path}: skipped {known.skipped} line(s) toa cannot check against "
              "(@cert-authority, unsupported key types or damaged lines)", file=sys.stderr)
    return index


def _remember_recorded(path: Path, hostname: str, key: paramiko.PKey) -> None:
    """A key just appended to PATH (under _KNOWN_HOSTS_LOCK) joins its index without a new read."""
    index = _INDEXES.get(str(path))
    if index is not None:
        index.plain.setdefault(hostname, []).append(paramiko.hostkeys.HostKeyEntry([hostname], key))
        with contextlib.suppress(OSError):
            index.signature = _signature(path)


def _load_known_hosts(client: paramiko.SSHClient, path: Path, name: str) -> list[paramiko.PKey]:
    """Add the entries of a known_hosts file that name NAME (the host as paramiko looks it up:
    `host`, or `[host]:port` off port 22) to the client; returns the file's revoked keys."""
    index = _index(path)
    host_keys = client.get_host_keys()
    for entry in index.entries_for(name):
        host_keys.add(name, entry.key.get_name(), entry.key)
    return index.revoked


# Ciphers toa asks for first where the host offers them: authenticated encryption, checked in the
# cryptography library. With the others (CTR + HMAC) paramiko compares every packet's MAC in a Python
# loop, which was a tenth of a deploy's own CPU. Hosts without them (OpenSSH before 6.2) get the rest.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _transport(*args, **kwargs) -> paramiko.Transport:
    transport = paramiko.Transport(*args, **kwargs)
    security = transport.get_security_options()
    offered = tuple(security.ciphers)
    security.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in offered) + tuple(
        c for c in offered if c not in PREFERRED_CIPHERS)
    return transport


def connect(spec: HostSpec, options: SshOptions = SshOptions()) -> Connection:
    """An open Fabric connection. Unknown or changed host keys are refused unless opted out."""
    # The banner and auth waits get the same budget as the TCP connect: a loaded host (or a guest
    # just booted) can take longer than paramiko's own 15 s default to greet.
    connect_kwargs = {"banner_timeout": options.timeout, "auth_timeout": options.timeout,
                      "transport_factory": _transport}
    if options.key_filename:
        connect_kwargs["key_filename"] = options.key_filename
    # Fabric fills what the spec leaves open (user, port, HostName, ProxyJump) from ~/.ssh/config.
    conn = Connection(
        spec.host, user=spec.user, port=spec.port,
        connect_timeout=options.timeout, connect_kwargs=connect_kwargs,
    )
    target = effective_target(spec, conn)
    revoked: list[paramiko.PKey] = []
    if options.check_host_key:
        # the name paramiko looks the host's key up by (SSHClient.connect)
        name = conn.host if conn.port == 22 else f"[{conn.host}]:{conn.port}"
        system = Path.home() / ".ssh" / "known_hosts"
        if system.is_file():
            revoked += _load_known_hosts(conn.client, system, name)
        if options.known_hosts and Path(options.known_hosts).is_file():
            revoked += _load_known_hosts(conn.client, Path(options.known_hosts), name)
        elif options.known_hosts and not options.accept_new_host_keys:  # accept-new creates it
            raise ToaError(f"known_hosts file {options.known_hosts} does not exist: fix --known-hosts")
        if options.accept_new_host_keys:
            record_in = Path(options.known_hosts or Path.home() / ".ssh" / "known_hosts")
            conn.client.set_missing_host_key_policy(_RecordNewHostKey(record_in))
        else:
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        conn.client.set_missing_host_key_policy(paramiko.WarningPolicy())
    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise ToaError(
            f"host key of {target} does not match known_hosts: verify the host, then update known_hosts"
        ) from None
    except paramiko.AuthenticationException:
        raise ToaError(f"SSH authentication to {target} failed: pass --key FILE or load the key into ssh-agent") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise ToaError(
                f"host key of {target} is unknown: add it to ~/.ssh/known_hosts or pass --known-hosts FILE "
                "(see --help for accepting new keys)"
            ) from None
        if "banner" in str(exc) or str(exc) == "No existing session":  # paramiko's words for a handshake cut short
            raise ToaError(f"SSH to {target} failed: no SSH handshake within {options.timeout:g} s "
                           "(the host hangs or is overloaded)") from None
        raise ToaError(f"SSH to {target} failed: {exc}") from None
    except (OSError, socket.timeout) as exc:
        raise ToaError(f"cannot reach {target}: {exc.strerror or exc}") from None
    if revoked and conn.transport.get_remote_server_key() in revoked:
        conn.close()
        raise ToaError(f"host key of {target} is listed under @revoked in known_hosts: it must not be trusted")
    return conn


def effective_target(spec: HostSpec, conn: Connection) -> str:
    """Where a connection really goes once ssh_config has filled in the spec: user@host:port, the
    alias it was given as, and the jump host on the way."""
    host = f"[{conn.host}]" if ":" in conn.host else conn.host
    shown = f"{conn.user}@{host}:{conn.port}"
    if conn.host != spec.host:
        shown += f" ({spec.host} in ssh_config)"
    gateway = conn.gateway
    if isinstance(gateway, Connection):
        shown += f" via {gateway.user}@{gateway.host}:{gateway.port}"
    elif gateway:
        shown += f" via ProxyCommand {gateway}"
    return shown


class ConnectionLost(ToaError):
    """The host stopped answering within the time limit, or the connection broke: nothing more can
    be run over this connection."""


# Errors of a connection that broke under a command or a transfer (invoke's reader threads wrap them).
_BROKEN = (paramiko.SSHException, EOFError, OSError, ThreadException)
# invoke's timer starts only once the command runs: opening the channel, the exec request and SFTP
# wait for the host without a limit of their own. A watchdog closes the whole connection this long
# after the limit, which ends every one of those waits.
WATCHDOG_GRACE_SECONDS = 5.0
# How often the transport sends a keepalive; unacknowledged for longer than the limit, the kernel
# drops the connection (TCP_USER_TIMEOUT) rather than retrying for a quarter of an hour.
KEEPALIVE_SECONDS = 5

T = TypeVar("T")


# Each connection's limit by its transport, as limit() set it: reading it back through invoke's
# config proxy costs more than the rest of a short command's bookkeeping.
_LIMITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _limit_of(conn: Connection) -> float | None:
    seconds = _LIMITS.get(conn.transport, _LIMITS) if conn.transport is not None else _LIMITS
    return conn.config.timeouts.command if seconds is _LIMITS else seconds


def limit(conn: Connection, seconds: float | None) -> None:
    """Give every later run() and put() on CONN at most SECONDS (None: no limit) and watch the
    connection for a host that vanished."""
    conn.config.timeouts.command = seconds
    _LIMITS[conn.transport] = seconds
    conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    sock = conn.transport.sock
    if seconds and isinstance(sock, socket.socket) and hasattr(socket, "TCP_USER_TIMEOUT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


def _bounded(conn: Connection, what: str, operation: Callable[[], T]) -> T:
    """OPERATION (a command or a transfer on CONN) within the connection's limit; a host that does
    not answer in time, or a connection that breaks, is a ConnectionLost naming the host and WHAT."""
    seconds = _limit_of(conn)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(Exception):
            conn.close()

    def no_answer() -> ConnectionLost:
        return ConnectionLost(f"no answer from {conn.host} within {seconds:g} s ({what}): the host hangs or is gone")

    timer = None
    if seconds:
        timer = threading.Timer(seconds + WATCHDOG_GRACE_SECONDS, expire)
        timer.daemon = True
        timer.start()
    try:
        result = operation()
    except (CommandTimedOut, _CommandTimedOut):
        raise no_answer() from None
    except _BROKEN as exc:
        if expired.is_set():
            raise no_answer() from None
        raise ConnectionLost(f"connection to {conn.host} lost ({what}): {exc or type(exc).__name__}") from None
    finally:
        if timer is not None:
            timer.cancel()
    if expired.is_set():
        raise no_answer()
    return result


class _CommandTimedOut(Exception):
    """The command outlived the connection's limit (before the watchdog's grace ran out)."""


def _deadline(conn: Connection) -> float | None:
    seconds = _limit_of(conn)
    return time.monotonic() + seconds if seconds else None


def _drain(channel: paramiko.Channel, receive: Callable[[int], bytes], deadline: float | None,
           on_line: Callable[[str], None] | None = None, until: bytes | None = None,
           received: bytes = b"") -> bytes:
    """Everything RECEIVE (the channel's stdout or stderr) gives until EOF, by DEADLINE (monotonic),
    after RECEIVED (read from it earlier); ON_LINE is called with each whole line as it arrives.
    With UNTIL, it stops as soon as what it read holds UNTIL."""
    chunks, pending, seen = [], b"", 0
    data = received
    while True:
        if data:
            chunks.append(data)
            if on_line:
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
            if until is not None:
                text = b"".join(chunks)
                if until in text[max(0, seen - len(until)):]:  # where it can be that was not looked at
                    return text
                seen = len(text)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _CommandTimedOut()
            channel.settimeout(remaining)
        try:
            data = receive(65536)
        except socket.timeout:
            raise _CommandTimedOut() from None
        if not data:
            return b"".join(chunks)


def _exec(conn: Connection, command: str, stdin: bytes = b"",
          on_line: Callable[[str], None] | None = None) -> Result:
    """COMMAND on one SSH channel of CONN, STDIN sent whole and then closed, its output read here
    (ON_LINE called with each stdout line as it arrives). What Fabric's run does for toa's commands,
    at a fraction of the CPU: invoke's runner reads its configuration and starts three threads for
    every command, which at thousands of hosts was a third of a deploy's own CPU. stdout is read to
    its end before stderr: toa's commands write little to stderr, far less than the channel's
    window, so a command cannot block on a full stderr meanwhile."""
    channel = _open_channel(conn, command)
    try:
        return _finish(conn, channel, command, stdin, on_line)
    finally:
        channel.close()


def _open_channel(conn: Connection, command: str) -> paramiko.Channel:
    if not conn.is_connected:
        conn.open()
    channel = conn.transport.open_session()  # a host that never answers: the watchdog (_bounded)
    try:
        channel.exec_command(command)
    except BaseException:
        channel.close()
        raise
    return channel


def _finish(conn: Connection, channel: paramiko.Channel, command: str, stdin: bytes,
            on_line: Callable[[str], None] | None, received: bytes = b"") -> Result:
    """Send STDIN to the command on CHANNEL, then end its input; its Result once it exited (RECEIVED:
    stdout read from it earlier)."""
    deadline = _deadline(conn)
    if stdin:
        channel.sendall(stdin)
    channel.shutdown_write()  # the command reads end-of-file after STDIN
    stdout = _drain(channel, channel.recv, deadline, on_line, received=received)
    stderr = _drain(channel, channel.recv_stderr, deadline)
    exited = channel.recv_exit_status()  # sent with the end of the output; the watchdog bounds the rest
    if exited == -1 and not conn.transport.is_active():  # closed under the command, no status
        raise EOFError("the connection closed")
    return Result(stdout=stdout.decode("utf-8", "replace"), stderr=stderr.decode("utf-8", "replace"),
                  command=command, exited=exited, hide=("stdout", "stderr"))


class Session:
    """A command that answers twice on one channel: what it prints up to a line MARK (`first`), then,
    once it was given the rest of its input (finish), everything after. Two round trips that need
    one command's state between them (toa's facts, then the apply they lead to) pay for one channel
    and one shell on the host. A command that ends before MARK is over at once: `ended` holds its
    Result. Each part runs within the connection's limit."""

    def __init__(self, conn: Connection, command: str, mark: str, what: str):
        self.conn, self.command, self.what = conn, command, what
        self.channel: paramiko.Channel | None = None
        self.ended: Result | None = None
        self._after = b""  # what came after MARK with the first part
        self.first = _bounded(conn, what, lambda: self._start(f"\n{mark}\n".encode()))

    def _start(self, mark: bytes) -> str:
        channel = _open_channel(self.conn, self.command)
        try:
            head = _drain(channel, channel.recv, _deadline(self.conn), received=b"\n", until=mark)
            if mark not in head:  # the command ended first
                self.ended = _finish(self.conn, channel, self.command, b"", None, head[1:])
                channel.close()
                return self.ended.stdout
        except BaseException:
            channel.close()
            raise
        first, _, self._after = head.partition(mark)
        self.channel = channel
        return first[1:].decode("utf-8", "replace")

    @property
    def waiting(self) -> bool:
        """Whether the command waits for the rest of its input (finish)."""
        return self.channel is not None

    def finish(self, stdin: bytes, what: str, on_line: Callable[[str], None] | None = None) -> Result:
        """Send STDIN, end the input; the Result of the second part (the first is not in it)."""
        channel, self.channel = self.channel, None
        if channel is None:
            raise ToaError(f"internal error: {self.what} on {self.conn.host} is not waiting for more input")
        try:
            return _bounded(self.conn, what, lambda: _finish(self.conn, channel, self.command, stdin, on_line,
                                                             self._after))
        finally:
            channel.close()

    def close(self) -> None:
        """End the command's input without a second part (it exits) and let the channel go."""
        channel, self.channel = self.channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.shutdown_write()
            with contextlib.suppress(Exception):
                channel.close()


def execute(conn: Connection, command: str, what: str = "a command") -> Result:
    """Run a fixed command on the host within the connection's limit; its invoke Result, failed or not."""
    return _bounded(conn, what, lambda: _exec(conn, command))


def command_failed(conn: Connection, result: Result) -> ToaError:
    """The one-line error of a command that failed: its exit status and last line of output."""
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return ToaError(f"command failed on {conn.host} (exit {result.exited}): {tail[0]}")


def run(conn: Connection, command: str, what: str = "a command") -> str:
    """Run a fixed command on the host and return its stdout; a failure is a ToaError."""
    result = execute(conn, command, what)
    if result.failed:
        raise command_failed(conn, result)
    return result.stdout


def put(conn: Connection, local: str, remote: str, what: str = "upload") -> None:
    """Copy a local file to the host over SFTP within the connection's limit."""
    _bounded(conn, what, lambda: conn.put(local, remote))


def run_streaming(conn: Connection, command: str, stdin: bytes, what: str,
                  on_line: Callable[[str], None] | None = None) -> Result:
    """Run COMMAND on the host with STDIN as its input, calling ON_LINE with each line of its stdout
    as it arrives; within the connection's limit. One exec request: a file can travel with the
    script that uses it, binary as it is. Its Result, failed or not."""
    return _bounded(conn, what, lambda: _exec(conn, command, stdin, on_line))
