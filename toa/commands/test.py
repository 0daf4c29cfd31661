"""`invoke test`: the test suite, whole or by marker."""

from invoke import Exit, task

# What `invoke test` runs when given no selection: everything but the `slow` tier (the tests that take
# many minutes each on TCG guests), so that the whole run fits a CI job's time; --slow adds them.
DEFAULT_SELECTION = "not slow"


@task(help={"fast": "only the pure tests: no network, Docker, sshd or QEMU (under a minute), in a network "
                    "namespace of their own where unshare allows it",
            "slow": "every test, the slow tier included (a kernel upgraded inside a guest, the Ansible role's "
                    "four runs on TCG guests: about 45 minutes more)",
            "marker": "only tests matching this pytest -m expression over the markers pure, network, docker, "
                      "ssh, lab and slow (the whole selection: `--marker slow` runs the slow tier)",
            "k": "only tests matching this pytest -k expression"})
def test(c, fast=False, slow=False, marker=None, k=None):
    """Run the test suite (real Docker, real QEMU boots, real sshd) but its slow tier; the slowest tests are
    listed at the end."""
    import shlex
    import shutil
    import subprocess
    import sys

    if sum(map(bool, (fast, slow, marker))) > 1:
        raise Exit("give one of --fast, --slow and --marker", code=2)
    args = [sys.executable, "-m", "pytest"]
    if not slow:
        args += ["-m", "pure" if fast else marker or DEFAULT_SELECTION]
    if k:
        args += ["-k", k]
    # A pure test that reaches out anyway fails in a namespace without a network, instead of passing by luck.
    if fast and shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"]).returncode == 0:
        args = ["unshare", "--net", *args]
    result = c.run(" ".join(shlex.quote(a) for a in args), warn=True, pty=False)
    if result.exited == 5:
        raise Exit("pytest collected no tests: check the -k/-m selection (a run that tests nothing is no pass)",
                   code=5)
    if result.exited:
        raise Exit(code=result.exited)
