"""`invoke test`: the test suite, whole or by marker."""

from invoke import Exit, task


@task(help={"fast": "only the pure tests: no network, Docker, sshd or QEMU (under a minute), in a network "
                    "namespace of their own where unshare allows it",
            "marker": "only tests matching this pytest -m expression over the markers pure, network, docker, "
                      "ssh and lab",
            "k": "only tests matching this pytest -k expression"})
def test(c, fast=False, marker=None, k=None):
    """Run the test suite (real Docker, real QEMU boots, real sshd); the slowest tests are listed at the end."""
    import shlex
    import shutil
    import subprocess
    import sys

    if fast and marker:
        raise Exit("give --fast or --marker, not both", code=2)
    args = [sys.executable, "-m", "pytest"]
    if fast or marker:
        args += ["-m", "pure" if fast else marker]
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
