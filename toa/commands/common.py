"""What every task shares: one-line errors, JSON and table output, progress, SSH flags."""

import contextlib
import functools
import inspect
import json as jsonlib

from invoke import Exit

from toa.errors import ToaError


def user_errors(fn):
    """Turn a ToaError into one line on stderr and exit status 2, never a stack trace. invoke's own
    --dry (echo commands instead of running them) means --dry-run for a task that has one; a task
    without one refuses it rather than run for real."""
    has_dry_run = "dry_run" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if args and args[0].config.run.dry:
                if not has_dry_run:
                    raise ToaError(f"--dry is invoke's echo-only mode and `{fn.__name__}` has no dry run: "
                                   "leave --dry out")
                kwargs["dry_run"] = True
            return fn(*args, **kwargs)
        except ToaError as exc:
            raise Exit(f"toa: error: {exc}", code=2)
        except KeyboardInterrupt:
            raise Exit("toa: interrupted", code=130)
        except BrokenPipeError:  # output piped into `head` and the like
            raise Exit(code=0)

    return wrapper


# The shape of every task's --json; raised when a field changes meaning or goes away (new fields keep it).
JSON_VERSION = 1


def print_json(task: str, items, **fields):
    """Every task's --json, one shape whatever the count: {"version": JSON_VERSION, "task": TASK, "items":
    [one object per kernel, host, package, ...]} plus the task's own summary FIELDS (deploy's "failed")."""
    print(jsonlib.dumps({"version": JSON_VERSION, "task": task, "items": list(items), **fields}, indent=2,
                        sort_keys=True))


SSH_HELP = {
    "host": "[user@]host[:port] to inspect over SSH instead of this machine",
    "key": "SSH private key file (default: ssh-agent and ~/.ssh keys)",
    "known_hosts": "extra known_hosts file to check host keys against",
    "no_host_key_check": "accept unknown host keys (explicit opt-out; keys are checked by default)",
}


def ssh_connect(host, key, known_hosts, no_host_key_check):
    from toa import remote

    options = remote.SshOptions(key_filename=key, known_hosts=known_hosts, check_host_key=not no_host_key_check)
    return remote.connect(remote.parse_host(host), options)


def print_table(title, columns, rows, *, caption=None, header=True):
    """Every task's table on stdout: TITLE, the COLUMNS' headings, ROWS of cells. A rich Text cell keeps
    its style (see verdict); any other is shown as plain text, never read as rich markup, "-" when empty."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left", show_header=header)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(cell if isinstance(cell, Text) else Text("-" if cell in (None, "") else str(cell))
                        for cell in row))
    Console().print(table)


def verdict(ok, passed="PASS", failed="FAIL"):
    """A check's result as a cell: PASSED in green, FAILED in bold red, "-" when it did not run (None)."""
    from rich.text import Text

    if ok is None:
        return Text("-")
    return Text(passed, style="green") if ok else Text(failed, style="bold red")


def print_fields(title, fields):
    """One record as a two-column table: each field's name (bold) and its value."""
    from rich.text import Text

    print_table(title, ("field", "value"), [(Text(key, style="bold"), _shown(value)) for key, value in fields.items()],
                header=False)


def _shown(value) -> str:
    """A field's value as a person reads it: lists comma-separated, mappings one NAME=VALUE per line."""
    if value in (None, "", [], {}):
        return "-"
    if isinstance(value, dict):
        return "\n".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


@contextlib.contextmanager
def progress(console):
    """A rich status line; yields the function that updates it."""
    with console.status("starting") as status:
        yield lambda message: status.update(message)


def module_options(words) -> dict[str, str]:
    """--option NAME=VALUE flags as a dict (toa.render checks the names and values)."""
    options = {}
    for word in words or []:
        name, sep, value = word.partition("=")
        if not sep:
            raise ToaError(f"invalid --option {word[:40]!r}: give NAME=VALUE, e.g. kinds=254,253")
        options[name] = value
    return options


def whole_number(value, flag: str, minimum: int, default: int | None = None) -> int | None:
    """VALUE of FLAG (e.g. --parallel) as an int of at least MINIMUM (DEFAULT when not given); one line naming
    the flag otherwise. Tasks declare such flags with a None default, so that invoke hands over the text
    (an int default makes invoke convert it itself, with a stack trace for `--parallel many`)."""
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise ToaError(f"{flag} must be a whole number of at least {minimum}, not {value!r}")
    return number
