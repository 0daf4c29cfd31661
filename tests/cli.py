"""Run the real `toa` command the way a user does, for tests."""

import subprocess
import sys


def toa(*args, timeout=600, env=None):
    """Run `toa ARGS...` in a subprocess; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-c", "from toa.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env,
    )


def assert_one_line_error(result, *fragments):
    """A user error: non-zero exit, one line on stderr naming the problem, no stack trace."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def json_items(result, task):
    """A task's --json output: checks its one shape ({"version": 1, "task": TASK, "items": [...]}) and
    returns the items."""
    import json

    data = json.loads(result.stdout)
    assert (data["version"], data["task"]) == (1, task) and isinstance(data["items"], list), data
    return data["items"]
