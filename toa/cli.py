"""The ``toa`` console command: the same tasks as tasks.py, where there is no tasks.py."""

import sys

from invoke import Program

from toa import __version__
from toa.tasks import ns

program = Program(namespace=ns, version=__version__, name="toa", binary="toa")


def main():
    try:
        program.run()
    except BrokenPipeError:  # help or output piped into `head` and the like
        sys.stderr.close()
