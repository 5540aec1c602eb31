"""One writer per output folder: an advisory ``fcntl`` lock on ``<folder>/.instsynth-lock``.

The kernel releases the lock when its process dies (also on ``kill -9``), so a stale lock file never
blocks. A second writer fails at once with :class:`LockedError` (one line naming the holder's pid),
unless ``wait`` is true or ``INSTSYNTH_LOCK_WAIT=1`` is set (the experiment harness sets it, so arms
sharing a folder wait for each other and reuse what the first one wrote).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from instsynth.core.io import TEMP_PREFIX, InstSynthError, output_error
from instsynth.core.paths import check_disjoint

LOCK_NAME = ".instsynth-lock"
WAIT_ENV = "INSTSYNTH_LOCK_WAIT"
EXPERIMENT_LOCK = ".instsynth-experiment-lock"
"""The experiment harness's lock of an arm's data folder (separate from the stages' own lock)."""
log = logging.getLogger("instsynth")
_HELD: set[tuple[str, str]] = set()  # (real folder, lock name) held by this process: taking it again is a no-op


class LockedError(InstSynthError):
    """The output folder is held by another InstSynth run."""

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip() or "?"
    return "?"


def _acquire(folder: Path, path: Path, wait: bool) -> int:
    """An fd of ``path`` holding its exclusive lock; retried when the file was removed meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockedError(folder, f"is being written by another InstSynth run (pid {_holder(fd)}); "
                                              "wait for it or choose another output folder") from None
                log.info("%s is being written by another InstSynth run (pid %s); waiting for it", folder, _holder(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file as it finished: lock the new one


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, wait: bool | None = None, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold the advisory lock of ``folder`` (created if missing) for the ``with`` block; the lock file
    is removed when the block ends (a killed run's file stays and is simply locked again)."""
    folder = Path(folder)
    wait = os.environ.get(WAIT_ENV) == "1" if wait is None else wait
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    path, key = folder / name, (os.path.realpath(folder), name)
    if key in _HELD:
        yield path
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder, path, wait)
    except OSError as exc:
        _remove_empty(created)
        raise output_error(path, exc) from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        yield path
    finally:
        _HELD.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock, so nobody else holds this file
        os.close(fd)  # closing releases the lock
        _remove_empty(created)  # a run that wrote nothing leaves no empty folder behind


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def remove_temp_files(folder: str | os.PathLike) -> int:
    """Delete this project's temporary files (``.instsynth-tmp-*``) left under ``folder`` by a killed run.

    Sub-folders holding their own lock file belong to another stage's output and are left alone.
    """
    removed = 0
    for here, dirs, files in os.walk(folder):
        if here != str(folder) and LOCK_NAME in files:
            dirs.clear()
            continue
        for name in files:
            if name.startswith(TEMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(here, name))
                    removed += 1
    if removed:
        log.info("%s: removed %d temporary files left by an interrupted run", folder, removed)
    return removed


@contextlib.contextmanager
def stage_output(out: str | os.PathLike, inputs=(), what: str = "output folder") -> Iterator[Path]:
    """What every stage does before it writes into ``out``: refuse ``out`` overlapping one of ``inputs``
    (the dataset's trees and files), hold ``out``'s lock, then remove this project's temporary files left
    there by a killed run."""
    out = Path(out)
    check_disjoint(inputs, out, what)
    with output_lock(out):
        remove_temp_files(out)
        yield out


def holds_output(where: Callable[[dict], tuple]) -> Callable:
    """Decorate a stage function: ``where(arguments)`` gives ``(out, inputs)``; the whole call runs
    inside :func:`stage_output` (arguments are bound with their defaults applied; ``out`` None: no lock)."""

    def wrap(stage: Callable) -> Callable:
        signature = inspect.signature(stage)

        @functools.wraps(stage)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out, inputs = where(bound.arguments)
            if out is None:
                return stage(*args, **kwargs)
            with stage_output(Path(out).resolve(), [Path(p).resolve() for p in inputs]):
                return stage(*args, **kwargs)

        return run

    return wrap
