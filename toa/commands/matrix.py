"""`invoke matrix`: build and prove every Debian kernel reachable here, and write the results table."""

import datetime
from pathlib import Path

from invoke import Exit, task

from toa.commands.common import print_json, print_table, user_errors, verdict, whole_number
from toa.debian import SUITES as DEBIAN_SUITES
from toa.errors import ToaError



# Lighter lab settings than `invoke verify`'s (fuzz 1000, cycles 100): the matrix boots every kernel.
@task(iterable=["suite"], auto_shortflags=False,
      help={"suite": f"run only this Debian suite's newest kernel; repeat for more (default: all: "
                     f"{', '.join(DEBIAN_SUITES)})",
            "fuzz": "random-option handshakes per kernel (default: 200; `invoke verify` uses 1000)",
            "cycles": "insmod/rmmod cycles per kernel (default: 10; `invoke verify` uses 100)",
            "timeout": "seconds before a guest that has not powered off is killed (default: 900)",
            "seed": "fuzz seed for every kernel, to replay a run (default: random, kept in the table)",
            "out": "where matrix.md and matrix.json go (default: docs)",
            "dist": "where the built modules and lab logs go (default: dist)",
            "readme": "the README whose section between <!-- matrix:begin --> and <!-- matrix:end --> "
                      "gets the table (default: README.md)",
            "no_readme": "leave the README alone",
            "plan": "print every row and the command it runs (here and on GitHub) instead of running",
            "json": "with --plan: print JSON (the workflow reads its job matrices from it)"})
@user_errors
def matrix(c, suite=None, fuzz=None, cycles=None, timeout=None, seed=None, out="docs", dist="dist",
           readme="README.md", no_readme=False, plan=False, json=False):
    """Build and prove (QEMU lab) each Debian suite's newest kernel; write docs/matrix.md and .json."""
    from rich.console import Console

    from toa import matrix as matrices

    suites = matrices.pick_suites(suite)
    if plan:
        rows = matrices.plan(suites)
        if json:
            print_json("matrix", rows["local"], github=rows["github"])
        else:
            _print_plan(rows)
        return
    if json:
        raise ToaError("--json goes with --plan; a run writes its JSON to --out")
    settings = matrices.LabSettings(
        fuzz=whole_number(fuzz, "--fuzz", 0, 200), cycles=whole_number(cycles, "--cycles", 0, 10),
        timeout=whole_number(timeout, "--timeout", 1, 900), seed=whole_number(seed, "--seed", 0),
    )
    readme_path = None if no_readme else Path(readme)
    if readme_path is not None:
        matrices.check_readme(readme_path)  # before the long run, not after it
    started = datetime.datetime.now(datetime.timezone.utc)
    console = Console(stderr=True)
    rows = _run(suites, settings, Path(dist), console)
    doc = matrices.results(rows, settings, started=started, repo=Path.cwd())
    written = matrices.write(doc, Path(out), readme_path)
    _print_rows(rows)
    failed = [row.suite for row in rows if not row.ok]
    console.print(f"{len(rows) - len(failed)}/{len(rows)} kernels passed"
                  + (f" (failed: {', '.join(failed)})" if failed else "")
                  + f"; wrote {', '.join(map(str, written))}", soft_wrap=True)
    if failed:
        raise Exit(code=1)


def _run(suites, settings, dist, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from toa import matrix as matrices

    rows = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("matrix", total=len(suites))
        for name in suites:
            def say(message, name=name):
                progress.update(overall, description=f"{name}: {message}"[:100])

            row = matrices.run_suite(name, settings, dist=dist, say=say)
            rows.append(row)
            verdict = "PASS" if row.ok else "FAIL"
            progress.console.print(f"{verdict} {name} {row.kernel or ''} {row.error}".rstrip(),
                                   soft_wrap=True, markup=False, highlight=False)
            progress.advance(overall)
    return rows


def _print_rows(rows):
    from toa.matrix import LAB_COLUMNS

    headings = {"toa_loaded": "TOA loaded", "v4": "v4 proof", "v6": "v6 proof"}
    columns = ("suite", "kernel", "build", *LAB_COLUMNS, "lab", "checks")
    print_table("toa matrix", [headings.get(column, column) for column in columns],
                [(row.suite, row.kernel, verdict(row.build), *(verdict(getattr(row, column)) for column in LAB_COLUMNS),
                  verdict(row.lab), f"{row.checks_passed}/{row.checks_total}") for row in rows])


def _print_plan(rows):
    print_table("toa matrix: rows and their commands", ("where", "row", "command"),
                [("here", row["suite"], row["command"]) for row in rows["local"]]
                + [("GitHub", f"{row['name']} {row['kernel']}", row["command"]) for row in rows["github"]["builds"]]
                + [("GitHub", row["suite"], "; ".join(row["commands"])) for row in rows["github"]["debian"]])
