"""Errors that are the user's to fix (a bad option, path or input file), not glag's.

The command-line tools print their message, which names the problem and the fix, without a
traceback, and exit with status 2 (:func:`tools._common.cli_main`). Library callers catch them
as ``ValueError``.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what was asked: an option out of range, a path that cannot be used, a bad input."""


class RunExistsError(UsageError, FileExistsError):
    """``--out`` already holds a run (or other files) and ``--resume`` was not given."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A file the user named (a checkpoint, a feature file, ...) does not exist."""
