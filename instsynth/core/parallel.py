"""Worker processes shared by every stage: an ordered map that does not depend on the worker count.

Workers start from a forkserver (spawn where there is none), never plain fork: a child forked from a
process whose OpenCV thread pool has run can deadlock. Each worker runs OpenCV single-threaded (one
process per core already). If the workers cannot start at all (e.g. a script piped in on stdin), the
remaining tasks run in this process with a warning instead of hanging. What every task needs alike
(``shared``) is sent to each worker once, not pickled into every task.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .io import get_logger

T = TypeVar("T")
R = TypeVar("R")
log = get_logger(__name__)


_NOTHING = object()
_shared: Any = _NOTHING  # a worker's copy of ordered_map's ``shared``


def _single_threaded_worker(shared: Any = _NOTHING) -> None:
    global _shared
    import cv2

    cv2.setNumThreads(1)
    _shared = shared


def _with_shared(fn: Callable, task: Any) -> Any:
    return fn(_shared, task)


def _context(preload: str):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([preload])
    return ctx


def ordered_map(fn: Callable[..., R], tasks: Iterable[T], workers: int, chunksize: int = 1,
                shared: Any = _NOTHING) -> Iterator[R]:
    """Yield ``fn(task)`` (``fn(shared, task)`` when ``shared`` is given) for every task, in task order,
    computed by up to ``workers`` processes.

    ``fn`` must be a module-level function (its module is preloaded once by the forkserver); ``shared``
    is pickled once per worker. With one worker or one task everything runs in this process. Leaving
    the loop early cancels pending work.
    """
    tasks = list(tasks)
    processes = min(max(1, int(workers)), len(tasks))
    done = 0
    call = fn if shared is _NOTHING else partial(fn, shared)
    if processes > 1:
        pool = ProcessPoolExecutor(processes, mp_context=_context(fn.__module__), initializer=_single_threaded_worker,
                                   initargs=(shared,))
        remote = fn if shared is _NOTHING else partial(_with_shared, fn)
        try:
            for result in pool.map(remote, tasks, chunksize=chunksize):
                yield result
                done += 1
            return
        except BrokenProcessPool as exc:
            log.warning("worker processes failed (%s); running the remaining %d tasks in this process",
                        exc, len(tasks) - done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    yield from map(call, tasks[done:])
