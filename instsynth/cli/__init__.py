"""How every command-line script ends on an error a user can fix: one line on stderr, exit code 1.

    from instsynth.cli import command

    @command
    def main(argv=None) -> None:
        ...

Bad input (:class:`~instsynth.io.InstSynthError`), a refused write (:class:`~instsynth.io.OutputError`:
full disk, read-only or permission-denied folder) and any other OS error become
``error: <path>: <problem>``, also when raised in a worker process. ``INSTSYNTH_DEBUG=1`` shows the
traceback instead. This module imports nothing heavy, so ``--help`` stays fast.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

DEBUG_ENV = "INSTSYNTH_DEBUG"
F = TypeVar("F", bound=Callable)


def debug() -> bool:
    """True when ``INSTSYNTH_DEBUG`` is set (to anything but 0): errors keep their traceback."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(exc: BaseException) -> str | None:
    """``error: <path>: <problem>`` for an error a user can fix, None for a bug (keeps its traceback)."""
    from instsynth.core.io import InstSynthError, OutputError

    if isinstance(exc, (InstSynthError, OutputError)):
        return f"error: {exc}"
    if isinstance(exc, OSError):
        text = (exc.strerror or str(exc)).lower()
        return f"error: {exc.filename}: {text}" if exc.filename else f"error: {text}"
    return None


def command(main: F) -> F:
    """Decorate a script's ``main``: user-fixable errors raise ``SystemExit("error: ...")`` (exit code 1)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            line = None if debug() else error_line(exc)
            if line is None:
                raise
            raise SystemExit(line) from None

    return run  # type: ignore[return-value]
