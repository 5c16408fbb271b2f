"""Initialisers of the worker processes the data layer starts (preprocessing, SynME).

A worker must end with its run: it dies with its parent (``PR_SET_PDEATHSIG``, Linux), ends
at once on SIGTERM (what SLURM and ``kill`` send), and ignores SIGINT: Ctrl-C reaches the whole
process group, and only the main process decides (it stops the pool and prints one line with
the way to resume), so no worker prints a ``KeyboardInterrupt`` trace of its own. The engine's
fold and client workers use the same :func:`prepare_worker`.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def prepare_worker(parent_pid: int | None = None) -> None:
    """In a worker: die with ``parent_pid`` (the process that started it), end at once on
    SIGTERM, leave SIGINT to the parent. (``PR_SET_PDEATHSIG`` follows the *thread* that
    started the worker: start pools from a thread that outlives them, e.g. the main thread.)

    SIGTERM gets its default action, not a Python handler: the kernel ends the whole process
    whichever thread receives the signal. A Python handler runs only when the *main* thread
    next executes bytecode, so a SIGTERM delivered to one of OpenCV's or torch's threads while
    the main thread waits on the pool's queue lock (which ``Pool.terminate`` holds from then
    on) was never acted on, and the parent's ``Pool.terminate`` waited for the worker forever.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the line above took effect


def image_worker(parent_pid: int | None = None) -> None:
    """:func:`prepare_worker` plus one OpenCV / OpenMP thread per worker (the pool is the
    parallelism; results do not depend on the worker count)."""
    import cv2

    prepare_worker(parent_pid)
    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # torch (magnify) is imported later, if at all


def image_pool_args() -> dict:
    """``initializer``/``initargs`` for a ``multiprocessing`` pool of image workers."""
    return {"initializer": image_worker, "initargs": (os.getpid(),)}


def image_pool(n: int, context: str = "spawn") -> multiprocessing.pool.Pool:
    """A pool of ``n`` image workers (spawned: fork is unsafe with threaded libraries).

    SIGINT is ignored in this process while the workers start: a spawned worker spends its
    first second importing, before its initializer runs, and a Ctrl-C then would print a
    ``KeyboardInterrupt`` trace from it. An ignored signal stays ignored across ``exec``, so the
    worker is born ignoring it; the main process's own handler is back once they are started.
    """
    ctx = multiprocessing.get_context(context)
    if threading.current_thread() is not threading.main_thread():
        return ctx.Pool(n, **image_pool_args())
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return ctx.Pool(n, **image_pool_args())
    finally:
        signal.signal(signal.SIGINT, previous)
