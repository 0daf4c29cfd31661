"""One host of a run: what the run asks of it (DeployOptions), what it reports (HostResult), and the
connection (Host) with the way to run commands as root on it.

Every remote command has a time limit (DeployOptions.command_timeout; the apply script as a whole);
connecting has SshOptions.timeout. A host that stops answering fails with the phase it was at; the
apply's outcome is then read through one reconnect (with the connect timeout), and a host that does
not come back holds only whole files, which the next run completes.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paramiko

from toa import remote
from toa.deploy.facts import APPLY_COMMAND, FACTS_END, Facts, HostRefused, facts_command, parse_facts
from toa.errors import ToaError
from toa.nodes import Node

# Seconds a command or transfer on a host may take (DeployOptions.command_timeout's default), and the
# connect timeout of the one reconnect a rollback makes after the connection was lost.
COMMAND_TIMEOUT_SECONDS = 120.0
RECONNECT_SECONDS = 15.0


# ---------------------------------------------------------------- what a run asks of a host, and what it reports


@dataclass
class HostResult:
    host: str
    kernel: str | None = None
    action: str = "failed"  # installed, updated, unchanged, failed, skipped; would-install, would-update
    detail: str = ""
    changes: list[str] = field(default_factory=list)
    engine: str | None = None  # module or bpf, once chosen
    script: str | None = None  # a dry run's: the apply script a run would send (apply_script)

    def as_dict(self) -> dict:
        return {"host": self.host, "kernel": self.kernel, "action": self.action, "detail": self.detail,
                "changes": self.changes, "engine": self.engine, "script": self.script}


@dataclass(frozen=True)
class DeployOptions:
    dist: Path = Path("dist")
    ssh: remote.SshOptions = remote.SshOptions()  # its timeout is the connect timeout
    options: dict[str, str] | None = None  # module options, e.g. {"kinds": "254,200"}
    build_missing: bool = False
    dry_run: bool = False
    command_timeout: float = COMMAND_TIMEOUT_SECONDS  # seconds each command or transfer on a host may take
    # which kernels get toa.ko: the running one (loaded), the one the next boot runs, every installed one
    kernels: tuple[str, ...] = ("running", "next")
    engine: str = "module"  # module, bpf, or auto (bpf where the host can run it, see choose_engine)


# ---------------------------------------------------------------- the connection


CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)


class Host:
    """One open connection and the way to run commands as root on it. Every command and transfer has
    COMMAND_TIMEOUT seconds; once one was cut short or the connection broke, the connection is lost:
    nothing more runs over it (see reconnect)."""

    def __init__(self, node: Node, ssh: remote.SshOptions, command_timeout: float, sudo: str = ""):
        self.node, self.ssh, self.command_timeout = node, ssh, command_timeout
        self.lost = False
        self.sudo = sudo  # "sudo -n " once the facts said the login is not root (read_facts)
        self.session: remote.Session | None = None  # the facts command, waiting to run the apply
        key = str(node.key) if node.key else ssh.key_filename
        self.conn = remote.connect(node.spec, dataclasses.replace(ssh, key_filename=key))
        try:
            remote.limit(self.conn, command_timeout)
        except BaseException:
            self.conn.close()
            raise

    def reconnect(self) -> Host:
        """A new connection to the same host after this one was lost: one attempt, with a connect
        timeout of at most RECONNECT_SECONDS."""
        self.close()
        ssh = dataclasses.replace(self.ssh, timeout=min(self.ssh.timeout, RECONNECT_SECONDS))
        return Host(self.node, ssh, self.command_timeout, self.sudo)

    def read_facts(self, symbols: tuple[str, ...] = ()) -> Facts:
        """The platform and state in one round trip (facts_command, with the preflight's reading for
        SYMBOLS); root or sudo settled by it."""
        user = self.node.spec.user or self.conn.user
        what = "reading the facts"
        self.close_session()
        session = self._call(what, lambda: remote.Session(self.conn, facts_command(self.node.sudo, symbols),
                                                          FACTS_END, what))
        if session.ended is not None and session.ended.failed:
            raise remote.command_failed(self.conn, session.ended)
        self.session = session if session.waiting else None
        facts = self.parse(what, lambda text: parse_facts(text, user, symbols), session.first)
        self.sudo = "sudo -n " if facts.sudo else ""
        return facts

    def apply(self, arguments: str, stdin: bytes, what: str, on_line) -> remote.Result:
        """The apply command (facts.APPLY_COMMAND) with ARGUMENTS and STDIN, as root: where the
        facts command still waits, on its channel (no channel and shell to start again)."""
        session, self.session = self.session, None
        if session is not None:
            return self._call(what, lambda: session.finish(f"apply {arguments}\n".encode() + stdin, what, on_line))
        command = f"{self.sudo}sh -c {shlex.quote(APPLY_COMMAND)} toa-apply {arguments}"
        return self._call(what, lambda: remote.run_streaming(self.conn, command, stdin, what, on_line))

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def _call(self, what: str, operation: Callable):
        if self.lost:
            raise remote.ConnectionLost(f"the connection to {self.node.name} was lost before {what}")
        try:
            return operation()
        except remote.ConnectionLost:
            self.lost = True
            raise

    def run_as_user(self, command: str, what: str) -> str:
        return self._call(what, lambda: remote.run(self.conn, command, what))

    def run_as_root(self, script: str, what: str) -> str:
        return self._call(what, lambda: remote.run(self.conn, f"{self.sudo}sh -c {shlex.quote(script)}", what))

    def put(self, local: Path, path: str) -> None:
        self._call("upload", lambda: remote.put(self.conn, str(local), path))

    def parse(self, what: str, parser: Callable, output: str):
        """PARSER(OUTPUT); output it cannot make sense of is a ToaError naming the host and WHAT."""
        try:
            return parser(output)
        except HostRefused:
            raise
        except (ToaError, ValueError, IndexError) as exc:
            raise ToaError(f"unexpected output from {self.node.name} ({what}): {exc}") from None

    def close(self) -> None:
        self.close_session()
        try:
            self.conn.close()
        except Exception:
            pass  # the host went away: nothing left to close politely


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ToaError):
        return str(exc)
    if isinstance(exc, CONNECTION_ERRORS):
        return f"connection lost: {exc or type(exc).__name__}"
    return f"unexpected error ({type(exc).__name__}: {exc}): please report it"
