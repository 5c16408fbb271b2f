"""Worker processes that end with their run.

SLURM (a time limit, a preemption) and ``kill`` send SIGTERM, to the whole process group or
to the main process alone. Left to themselves, forked fold / client workers would outlive it:
Lightning turns SIGTERM into an exception at the end of the batch, the pool catches it as the
job's result, and the worker takes the next job, orphaned, until SIGKILL. So:

- :func:`prepare_worker` (a pool's initializer) makes a worker die with its parent
  (``PR_SET_PDEATHSIG``, Linux) and end at once on SIGTERM; it ignores SIGINT (Ctrl-C reaches
  the whole group: the main process decides, and stops the workers).
- :func:`terminate_on_signal` (main thread) turns SIGTERM and SIGINT (Ctrl-C) into
  :class:`Terminated`, so the run unwinds through its ``finally`` blocks: workers stopped,
  nothing half written, saved work (LOSO ``folds_done/``, the federated checkpoint) left for
  ``resume=true``. (A ``KeyboardInterrupt`` would be caught on its way by Lightning, which
  prints its own "graceful shutdown" and carries on in some places; ``Terminated`` is a
  ``SystemExit``, which every layer lets through.)
- :func:`stop_pool` kills a pool's workers now, without waiting for their jobs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from mer.data.workers import prepare_worker  # noqa: F401 (the engine's workers use it too)


class Terminated(SystemExit):
    """The run received SIGTERM or SIGINT (exit status 128 + the signal: 143, 130); saved work
    is kept for resume=true."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    @property
    def what(self) -> str:
        """``interrupted`` (Ctrl-C) or ``terminated (SIGTERM)``."""
        if self.signum == signal.SIGINT:
            return "interrupted"
        return f"terminated ({signal.Signals(self.signum).name})"

    def __str__(self) -> str:
        return (f"{self.what}: finished work is saved; rerun with resume=true (same "
                "hydra.run.dir) to continue")


@contextlib.contextmanager
def terminate_on_signal() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise :class:`Terminated` in the main thread (no-op in
    another thread, where Python cannot install handlers). A SIGINT that was ignored when
    entering (a background job's) stays ignored. The previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Terminated(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Kill ``pool``'s worker processes now and shut it down without waiting for its jobs.
    (The executor offers no public handle on its processes: ``_processes`` is read, if any.)"""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.kill()
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(timeout=5)
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)
