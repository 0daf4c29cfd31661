"""The task layer as a whole: one flag convention for every task."""

import pytest

from tests.cli import assert_one_line_error, toa
from toa.tasks import ns


def test_flags_are_long_only_except_the_test_runners_pytest_style():
    """`-o` meant --no-host-key-check in one task and --option in another: tasks take long flags only;
    `invoke test` keeps pytest's -k and -m (and -f for --fast, -s for --slow)."""
    for name, task in ns.tasks.items():
        shorts = sorted(flag for argument in task.get_arguments() for flag in argument.names if len(flag) == 1)
        if name == "test":
            assert shorts == ["f", "k", "m", "s"], shorts
        else:
            assert shorts == [], f"{name} has short flags {shorts}"


@pytest.mark.parametrize("task,flag,value", [
    ("verify", "--cycles", "x"), ("verify", "--fuzz", "-1"), ("verify", "--timeout", "0"), ("verify", "--seed", "1.5"),
    ("deploy", "--parallel", "0"), ("deploy", "--batch", "many"), ("matrix", "--fuzz", "ten"),
])
def test_a_bad_number_is_one_line_naming_the_flag_before_any_work(tmp_path, task, flag, value):
    """Every task reads its counts with one parser: `verify --cycles x` was a stack trace."""
    extra = {"verify": ["--suite", "bookworm"], "deploy": ["--hosts", str(tmp_path / "nodes.txt")],
             "matrix": ["--suite", "bookworm", "--no-readme", "--out", str(tmp_path)]}[task]
    if task == "deploy":
        (tmp_path / "nodes.txt").write_text("host1\n")
    assert_one_line_error(toa(task, *extra, flag, value), flag, "whole number")


def test_the_live_view_of_ten_thousand_hosts_stays_a_few_lines():
    """Counts per step, the hosts in progress and the failed ones, each cut at LIVE_ROWS: the view a
    deploy redraws several times a second does not grow with the fleet."""
    import io

    from rich.console import Console

    from toa.commands.deploy import LIVE_ROWS, FleetProgress

    names = [f"root@10.1.{i // 250}.{i % 250}" for i in range(10_000)]
    progress = FleetProgress(names)
    for index, name in enumerate(names[:3_000]):
        progress.report(name, "connect")
        progress.report(name, "failed" if index % 100 == 0 else "done")
    for name in names[3_000:3_020]:
        progress.report(name, "upload")
    progress.report(names[3_000], "load")
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(progress.view())
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "10000 host(s): waiting 6980, upload 19, load 1, done 2970, failed 30"
    assert len(lines) == 1 + LIVE_ROWS + 1 + LIVE_ROWS + 1
    assert lines[1].split() == [names[3_000], "load"]  # in the order they started
    assert lines[LIVE_ROWS + 1].strip() == "... and 12 more in progress"
    assert lines[-2].split() == [names[2_900], "failed"] and lines[-1].strip() == "... and 22 more failed"


def test_every_task_table_goes_through_the_one_printer():
    """Six table printers were one concept: only toa/commands/common.py builds a rich Table (deploy's live
    progress view draws plain lines)."""
    import ast
    from pathlib import Path

    import toa.commands

    builders = []
    for path in sorted(Path(toa.commands.__file__).parent.glob("*.py")):
        for function in ast.parse(path.read_text()).body:  # top-level functions, each with what it nests
            if not isinstance(function, ast.FunctionDef):
                continue
            calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)
                     and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Table"]
            if calls and (path.name, function.name) not in {("common.py", "print_table")}:
                builders.append(f"{path.name}:{function.name}")
    assert not builders, f"tables built outside common.print_table: {builders}"


def test_the_table_printer_shows_data_as_text_and_empty_cells_as_a_dash(capsys):
    from toa.commands.common import print_table, verdict

    print_table("t", ("a", "b", "c", "d"), [("[bold red]x[/]", None, verdict(True), verdict(None))])
    out = capsys.readouterr().out
    assert "[bold red]x[/]" in out  # a kernel or host string is never read as markup
    assert "PASS" in out and out.count("-") >= 2


def test_the_test_task_leaves_the_slow_tier_out_unless_asked_and_refuses_two_selections():
    """`invoke test` is what CI runs: a test marked slow is not in it (selected alone by -k, nothing is
    left: exit 5, said in one line); --slow, --fast and --marker are each a whole selection."""
    import subprocess
    import sys

    name = "test_kmod_path_the_hook_builds_toa_for_the_new_kernel"
    listed = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                             "-m", "slow", "-k", name], capture_output=True, text=True, timeout=300)
    assert f"tests/test_upgrade.py::{name}" in listed.stdout, listed.stdout[-500:]  # it exists, marked slow
    slow_only = toa("test", "-k", name, timeout=300)
    assert slow_only.returncode == 5 and "pytest collected no tests" in slow_only.stderr, slow_only.stderr
    for flags in (["--fast", "--slow"], ["--slow", "--marker", "lab"], ["--fast", "--marker", "lab"]):
        assert_one_line_error(toa("test", *flags), "give one of --fast, --slow and --marker")
