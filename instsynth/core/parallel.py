"""Worker processes shared by every stage: an ordered map that does not depend on the worker count.

Workers start from a forkserver (spawn where there is none), never plain fork: a child forked from a
process whose OpenCV thread pool has run can deadlock. Each worker runs OpenCV single-threaded (one
process per core already). If the workers cannot start at all (e.g. a script piped in on stdin), the
remaining tasks run in this process with a warning instead of hanging.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from .io import get_logger

T = TypeVar("T")
R = TypeVar("R")
log = get_logger(__name__)


def _single_threaded_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def _context(preload: str):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([preload])
    return ctx


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, chunksize: int = 1) -> Iterator[R]:
    """Yield ``fn(task)`` for every task, in task order, computed by up to ``workers`` processes.

    ``fn`` must be a module-level function (its module is preloaded once by the forkserver). With one
    worker or one task everything runs in this process. Leaving the loop early cancels pending work.
    """
    tasks = list(tasks)
    processes = min(max(1, int(workers)), len(tasks))
    done = 0
    if processes > 1:
        pool = ProcessPoolExecutor(processes, mp_context=_context(fn.__module__), initializer=_single_threaded_worker)
        try:
            for result in pool.map(fn, tasks, chunksize=chunksize):
                yield result
                done += 1
            return
        except BrokenProcessPool as exc:
            log.warning("worker processes failed (%s); running the remaining %d tasks in this process",
                        exc, len(tasks) - done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    yield from map(fn, tasks[done:])
