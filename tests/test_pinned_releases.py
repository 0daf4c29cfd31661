"""No test or benchmark names a Debian kernel the mirror still offers.

Debian replaces a suite's kernel ABI every few weeks and drops the old one from the index, so a test that
downloads a release written into its source breaks within weeks. Tests that download a kernel ask for
"the newest kernel of suite X" at run time; release strings in test sources are for pure tests only, and
they name kernels the mirror no longer offers (or never did), so that none of them can reach it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")])
# A full Debian amd64 release as `uname -r` prints it: 5.10.0-9-amd64, 6.12.9+deb13-amd64, 6.16.1+deb13-cloud-amd64.
RELEASE_RE = re.compile(r"(?<![0-9.])[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9]+|\+deb[0-9]+(?:\.[0-9]+)?)(?:-[a-z]+)?-amd64\b")


def named_releases(paths=SOURCES) -> dict[str, list[str]]:
    """{release: [file:line, ...]} for every Debian release written in the given files."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for release in RELEASE_RE.findall(line):
                where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                found.setdefault(release, []).append(f"{where}:{number}")
    return found


def test_the_scan_sees_every_form_of_release(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('A = "5.10.0-9-amd64"\nB = ["6.12.9+deb13-amd64", "6.12.9+deb13.1-amd64"]\n'
                      'C = "6.16.1+deb13-cloud-amd64"  # and not 6.1.0 or 16.1.0-56-amd64x or 6.1.0-56\n')
    assert sorted(named_releases([sample])) == sorted(["5.10.0-9-amd64", "6.12.9+deb13-amd64",
                                                       "6.12.9+deb13.1-amd64", "6.16.1+deb13-cloud-amd64"])


def test_the_scan_reads_the_test_sources():
    # the recorded guest output in test_deploy names the kernel it was recorded on: the scan must see it
    assert any(where.startswith("tests/test_deploy.py:") for where in named_releases().get("6.1.0-56-amd64", []))


@pytest.mark.network
def test_no_source_names_a_kernel_the_mirror_offers():
    from toa import debian

    offered = {kernel.release: suite for suite in debian.SUITES for kernel in debian.kernels_of_suite(suite)}
    pinned = {release: where for release, where in named_releases().items() if release in offered}
    assert not pinned, "kernels the mirror still offers, named in test sources (ask for the newest kernel of " \
                       "a suite instead, or use a release the mirror no longer has): " + "; ".join(
                           f"{release} ({offered[release]}) at {', '.join(where)}" for release, where in pinned.items())
