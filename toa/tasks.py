"""The invoke tasks: thin entry points that parse flags, call the package and print the result.

Used by the top-level tasks.py (``invoke ...``) and by the ``toa`` console command.
"""

import functools
import json as jsonlib

from invoke import Collection, Exit, task

from toa.errors import ToaError


def user_errors(fn):
    """Turn a ToaError into one line on stderr and exit status 2, never a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToaError as exc:
            raise Exit(f"toa: error: {exc}", code=2)
        except KeyboardInterrupt:
            raise Exit("toa: interrupted", code=130)

    return wrapper


def print_json(data):
    print(jsonlib.dumps(data, indent=2, sort_keys=True))


ns = Collection()
