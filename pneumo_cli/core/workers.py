"""A pool of worker processes that die with their parent (or an in-process map for one
worker)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

# --- scanning and processing ------------------------------------------------------------------

MapFn = Callable[[Callable[[Any], Any], list[Any]], Any]

_opencv_lock = threading.Lock()
_opencv_users = 0
_opencv_saved = 0


@contextlib.contextmanager
def single_threaded_opencv() -> Iterator[None]:
    """OpenCV's own thread pool off (one thread) while the block runs, then as it was.

    For code that already runs its OpenCV calls in parallel (pneumo's worker processes, the
    loader threads of ``predict`` beside the network): OpenCV splitting each call over threads
    of its own then only adds synchronisation, and its waiting threads take cores from the
    others. The setting is process-wide, so overlapping blocks (threads of one process) share
    it: the first turns the pool off, the last restores it.
    """
    import cv2

    global _opencv_users, _opencv_saved
    with _opencv_lock:
        if _opencv_users == 0:
            _opencv_saved = cv2.getNumThreads()
            cv2.setNumThreads(1)
        _opencv_users += 1
    try:
        yield
    finally:
        with _opencv_lock:
            _opencv_users -= 1
            if _opencv_users == 0:
                cv2.setNumThreads(_opencv_saved)


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[MapFn]:
    """Yield ``map_unordered(fn, items)``: inline for one worker, else a process pool.

    OpenCV's own threads are limited to one per process so that ``workers`` means cores.
    """
    with single_threaded_opencv():
        if workers == 1:
            yield lambda fn, items: map(fn, items)
            return
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        context = multiprocessing.get_context(method)
        with context.Pool(workers, initializer=_init_worker, initargs=(os.getpid(),)) as pool:

            def map_unordered(fn: Callable[[Any], Any], items: list[Any]) -> Any:
                chunk = max(1, min(16, len(items) // (workers * 8)))
                return pool.imap_unordered(fn, items, chunksize=chunk)

            yield map_unordered


def _init_worker(parent_pid: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker as soon as the main process dies (even by kill -9).

    Otherwise an orphaned worker would finish its chunk of images and keep writing into the
    cache after the run's lock counts as stale, while a re-run may already be working there.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)
