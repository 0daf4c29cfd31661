"""Errors a user can fix: printed as one line, never as a stack trace."""


class ToaError(Exception):
    """An expected failure. The message names the problem and the fix, on one line."""
