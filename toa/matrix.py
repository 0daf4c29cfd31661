"""The test matrix: which kernels toa is built for and proven on, where, and the results table.

Two kinds of rows, both kept here as data:
- local rows, one per Debian suite: `invoke matrix` fetches the suite's newest kernel, builds toa.ko
  for it and proves it in the QEMU lab, then writes the results table (Markdown and JSON);
- GitHub rows: the GitHub Actions workflow (.github/workflows/matrix.yml) reads them from
  `invoke matrix --plan --json`: one build job per distro row (`invoke build --kernel K --distro T`
  in that distro's container) and one build-and-lab job per Debian suite.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import jinja2

import toa
from toa import debian, lab, prove
from toa import kernel as kernels
from toa import targets
from toa.errors import ToaError
from toa.prove import LabSettings

README_BEGIN = "<!-- matrix:begin -->"
README_END = "<!-- matrix:end -->"

# Table columns read from the lab's checks (toa/lab.py, toa/guest/init.sh.j2, toa/guest/toa_peer.c):
# a column passes when every one of its checks ran and passed.
LAB_COLUMNS = {
    "boot": ("guest-booted", "guest-finished"),
    "toa_loaded": ("load-message",),  # the kernel logged exactly one "TOA: toa loaded"
    "v4": ("v4", "v4-mapped"),
    "v6": ("v6-kind253", "v6-kind254"),
}


@dataclass(frozen=True)
class DistroBuild:
    """A GitHub row: toa.ko built for one kernel of a distro release, in that release's container."""

    target: str  # an id in toa/targets.toml
    kernel: str  # the release as `uname -r` prints it there

    @property
    def argv(self) -> list[str]:
        return ["invoke", "build", "--kernel", self.kernel, "--distro", self.target]

    def as_dict(self) -> dict:
        return {"target": self.target, "name": targets.get(self.target).name, "kernel": self.kernel,
                "command": shlex.join(self.argv)}


# One kernel for each distro release whose kernels toa builds in a container of its own.
GITHUB_BUILDS = (
    DistroBuild("centos-7", "3.10.0-1160.el7.x86_64"),
    DistroBuild("rocky-8", "4.18.0-513.5.1.el8_9.x86_64"),
    DistroBuild("rocky-9", "5.14.0-362.8.1.el9_3.x86_64"),
    DistroBuild("ubuntu-18.04", "4.15.0-213-generic"),
    DistroBuild("ubuntu-20.04", "5.4.0-182-generic"),
    DistroBuild("ubuntu-22.04", "5.15.0-107-generic"),
    DistroBuild("ubuntu-24.04", "6.8.0-31-generic"),
    DistroBuild("opensuse-leap-15", "6.4.0-150600.23.7-default"),
    DistroBuild("fedora-coreos", "6.8.5-301.fc40.x86_64"),
)


def debian_commands(suite: str) -> list[list[str]]:
    """What a GitHub Debian job runs for one suite: the build, then the lab on the same kernel."""
    debian.check_suite(suite)
    return [["invoke", "build", "--suite", suite], ["invoke", "verify", "--suite", suite]]


def github_rows() -> dict:
    """The workflow's two job matrices: distro builds, and Debian suites built and booted in the lab."""
    return {
        "builds": [row.as_dict() for row in GITHUB_BUILDS],
        "debian": [{"suite": suite, "commands": [shlex.join(argv) for argv in debian_commands(suite)]}
                   for suite in debian.SUITES],
    }


def plan(suites: list[str]) -> dict:
    """Every row and the commands it runs, without running anything (`invoke matrix --plan`)."""
    return {
        "local": [{"suite": suite, "command": shlex.join(["invoke", "matrix", "--suite", suite])}
                  for suite in suites],
        "github": github_rows(),
    }


# ---------------------------------------------------------------- running the local rows


@dataclass
class Row:
    """The outcome of one suite: build, then the lab; a step that did not run stays None."""

    suite: str
    distro: str = ""
    kernel: str = ""
    build: bool | None = None
    boot: bool | None = None
    toa_loaded: bool | None = None
    v4: bool | None = None
    v6: bool | None = None
    lab: bool | None = None
    checks_passed: int = 0
    checks_total: int = 0
    failed_checks: list[str] = field(default_factory=list)
    seed: int | None = None
    fetch_seconds: float | None = None
    build_seconds: float | None = None
    lab_seconds: float | None = None
    error: str = ""
    ko: str = ""
    serial_log: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.build and self.lab)


def column_results(checks: list[lab.Check]) -> dict[str, bool]:
    """PASS/FAIL of each table column from a lab report's checks; a check that never ran fails."""
    passed = {check.name: check.passed for check in checks}
    return {column: all(passed.get(name, False) for name in names) for column, names in LAB_COLUMNS.items()}


def distro_of(release: str) -> str:
    """The distro release a Debian kernel belongs to, from toa/targets.toml (e.g. Debian 12 (bookworm))."""
    kernel = kernels.classify(release)
    return kernel.default_targets[0].name if kernel else "Debian"


def _shown(path: Path) -> str:
    """PATH relative to the working directory when inside it: the table is committed, machines differ."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def run_suite(suite: str, settings: LabSettings, *, dist: Path,
              say: Callable[[str], None] = lambda message: None) -> Row:
    """One proof (toa.prove: fetch the suite's newest kernel, build toa.ko for it, boot it in the lab);
    the stage that failed becomes the row's error."""
    # force: the matrix proves a build, not an artifact left by an earlier one
    proof = prove.prove(suite=suite, dist=dist, settings=settings, force=True, progress=say)
    row = Row(suite, fetch_seconds=proof.seconds.get("fetch"), build_seconds=proof.seconds.get("build"),
              lab_seconds=proof.seconds.get("lab"))
    if proof.fetched:
        row.kernel, row.distro = proof.release, distro_of(proof.release)
    if proof.stage == "fetch":
        row.error = f"fetch: {proof.error}"
        return row
    row.build = proof.built is not None
    if not row.build:
        row.error = f"build: {proof.error}"
        return row
    row.ko = _shown(proof.built.ko)
    report = proof.report
    if report is None:
        row.lab, row.error = False, f"lab: {proof.error}"
        return row
    row.lab, row.seed, row.serial_log = report.ok, report.seed, _shown(report.serial_log)
    row.checks_total = len(report.checks)
    row.checks_passed = sum(check.passed for check in report.checks)
    row.failed_checks = [check.name for check in report.failed]
    for column, passed in column_results(report.checks).items():
        setattr(row, column, passed)
    if not report.ok:
        row.error = "lab: failed " + ", ".join(row.failed_checks)
    return row


# ---------------------------------------------------------------- the results table


def _git_commit(repo: Path) -> str:
    try:
        result = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return "Linux"


def machine() -> dict:
    return {"os": _os_name(), "kernel": platform.release(), "arch": platform.machine(),
            "cpus": os.cpu_count(), "lab": "QEMU TCG, 1 vCPU"}


def results(rows: list[Row], settings: LabSettings, *, started: datetime.datetime, repo: Path) -> dict:
    """The whole run as the JSON document docs/matrix.json holds."""
    return {
        "generated_at": started.isoformat(timespec="seconds"),
        "toa_version": toa.__version__,
        "commit": _git_commit(repo),
        "machine": machine(),
        "lab_settings": {"fuzz": settings.fuzz, "cycles": settings.cycles, "timeout": settings.timeout},
        "ok": all(row.ok for row in rows),
        "rows": [{**asdict(row), "ok": row.ok} for row in rows],
        "github": github_rows(),
    }


_TEMPLATE = """\
Generated by `invoke matrix` on {{ doc.generated_at }}: toa {{ doc.toa_version }}, commit \
`{{ doc.commit }}`, on {{ doc.machine.os }} {{ doc.machine.arch }} ({{ doc.machine.cpus }} CPUs, host kernel \
{{ doc.machine.kernel }}); lab: {{ doc.machine.lab }}, with {{ doc.lab_settings.fuzz }} fuzz handshakes \
and {{ doc.lab_settings.cycles }} load/unload cycles per kernel.

**Ran here** (each Debian suite's newest kernel: fetched, built, booted, proven):

| distro | suite | kernel | build | boot | `TOA: toa loaded` | v4 proof | v6 proof | lab checks | fetch | build | lab |
|---|---|---|---|---|---|---|---|---|---|---|---|
{% for row in doc.rows %}
| {{ row.distro or "-" }} | {{ row.suite }} | {{ row.kernel or "-" }} | {{ row.build | verdict }} | \
{{ row.boot | verdict }} | {{ row.toa_loaded | verdict }} | {{ row.v4 | verdict }} | {{ row.v6 | verdict }} | \
{{ row.lab | verdict }}{% if row.checks_total %} {{ row.checks_passed }}/{{ row.checks_total }}{% endif %} | \
{{ row.fetch_seconds | seconds }} | {{ row.build_seconds | seconds }} | {{ row.lab_seconds | seconds }} |
{% endfor %}
{% for row in doc.rows if row.error %}
{% if loop.first %}

Failures:
{% endif %}
- {{ row.suite }}{% if row.kernel %} ({{ row.kernel }}){% endif %}: {{ row.error | replace("|", "/") }}
{% endfor %}

**Run only on GitHub Actions** (`.github/workflows/matrix.yml`; these distros' packages are not reachable \
from the machine above). Each distro row builds in a container of that distro release and keeps `dist/` as an \
artifact:

| distro | kernel | command |
|---|---|---|
{% for row in doc.github.builds %}
| {{ row.name }} | {{ row.kernel }} | `{{ row.command }}` |
{% endfor %}

and one job per Debian suite builds and runs the QEMU lab with `invoke verify`'s full settings:

| suite | commands |
|---|---|
{% for row in doc.github.debian %}
| {{ row.suite }} | {% for command in row.commands %}`{{ command }}`{% if not loop.last %}, then {% endif %}{% endfor %} |
{% endfor %}
"""


def _verdict(value: bool | None) -> str:
    return "-" if value is None else "PASS" if value else "FAIL"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def render_markdown(doc: dict) -> str:
    """The tables of a results document, as Markdown (the body of docs/matrix.md and of the README section)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(verdict=_verdict, seconds=_seconds)
    return env.from_string(_TEMPLATE).render(doc=doc)


def check_readme(path: Path) -> str:
    """README text that holds the matrix markers once each, in order; else one line saying what to fix."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ToaError(f"cannot read {path} ({exc.strerror}): pass --readme FILE or --no-readme") from None
    begin, end = text.count(README_BEGIN), text.count(README_END)
    if begin != 1 or end != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ToaError(f"{path} needs one {README_BEGIN} line and one {README_END} line after it, "
                       "between which the table goes: add them, or pass --no-readme")
    return text


def replace_in_readme(text: str, table: str) -> str:
    """README text with only what lies between the matrix markers replaced by TABLE."""
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{table.rstrip()}\n{README_END}{tail}"


def write(doc: dict, out_dir: Path, readme: Path | None) -> list[Path]:
    """docs/matrix.json, docs/matrix.md and the README section between the markers; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = render_markdown(doc)
    json_path, md_path = out_dir / "matrix.json", out_dir / "matrix.md"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    md_path.write_text("# toa test matrix\n\n" + table + "\nThe same run as JSON: `matrix.json`.\n")
    written = [json_path, md_path]
    if readme is not None:
        readme.write_text(replace_in_readme(check_readme(readme), table))
        written.append(readme)
    return written



def pick_suites(wanted: list[str] | None) -> list[str]:
    """The suites to run, in toa.debian's order; all of them by default."""
    if not wanted:
        return list(debian.SUITES)
    for suite in wanted:
        debian.check_suite(suite)
    return [suite for suite in debian.SUITES if suite in wanted]
