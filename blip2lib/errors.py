"""The one base class of mistakes a user can fix from the message alone, and how every CLI reports them.

``ParamsError`` (a params key or value), ``LoadError`` / ``CheckpointError`` (a checkpoint that does not fit),
``AnnotationError`` (a dataset entry) and ``JavaNotFoundError`` (a missing tool) derive from :class:`UserError`.
Every ``python -m blip2lib.*`` command turns a user error — or a missing / existing file — into one line on stderr
and exit status 2; ``-v`` shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input (params, files, data, environment) that the message alone explains."""


# What a user fixes by editing a path: reported like UserError (these come from the OS, not from blip2lib).
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def add_verbosity(ap: argparse.ArgumentParser) -> None:
    """``-v`` (tracebacks, debug logging) and ``-q`` (warnings and errors only) for a command."""
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging; show the traceback of an error")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")


def log_level(args: argparse.Namespace, default: int = logging.INFO) -> int:
    """The logging level ``-v`` / ``-q`` ask for (``default`` without either)."""
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return logging.WARNING if getattr(args, "quiet", False) else default


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (a grouped message's lines joined by `` | ``)."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def run_guarded(body: Callable[[], int], verbose: bool = False) -> int:
    """Run a command's ``body``; a user error becomes ``error: ...`` on stderr and exit status 2.

    Args:
        body: the command's work; returns its exit status.
        verbose: re-raise instead, so the traceback shows (``-v``).

    Returns:
        ``body()``'s status, or 2 after a user error.
    """
    try:
        return body()
    except (UserError, *FILE_ERRORS) as err:
        if verbose:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
