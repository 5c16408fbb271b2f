"""One run per run folder: ``<run dir>/.mer.lock``.

Two runs given the same ``hydra.run.dir`` (two LOSO seeds, two learning rates) would leave a
folder whose ``.hydra/config.yaml`` is one run's and whose ``results.json`` is the other's. The
first run holds an exclusive ``fcntl.flock`` on ``.mer.lock`` (which records its pid, host and
start time) until it exits; a second run is refused with the holder's pid and start time. The
kernel drops the lock when its process dies however it dies, so a lock file left by a killed
run (SIGKILL, a node crash) is stale: the next run takes it over with a warning (a requeued
SLURM task continuing with ``resume=true`` does exactly that).

Hydra writes ``.hydra/`` before the task function runs, so :class:`RunDirLock`, a Hydra
callback registered in ``conf/hydra/default.yaml``, takes the lock in ``on_run_start``: a
refused run exits (status 1, the reason on stderr) before it writes anything into the
folder. Multirun jobs (and runs started without the callback) take it at the top of
``mer.run.main``: there a refused job may have rewritten ``.hydra/`` of the folder already,
but never ``results.json``, which always holds its own run's resolved config.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".mer.lock"

_HELD: dict[Path, RunLock] = {}  # the run folders this process holds, by resolved path


class RunDirLocked(RuntimeError):
    """Another live run holds the run folder."""


class RunLock:
    """An exclusive lock on one run folder, held until :meth:`release` (or process exit)."""

    def __init__(self, run_dir: Path, fd: int, info: dict) -> None:
        self.run_dir, self.fd, self.info = run_dir, fd, info
        self.path = run_dir / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first: see :func:`acquire`)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self.fd)  # drops the flock
        self.fd = -1
        _HELD.pop(self.run_dir, None)


def _holder(fd: int) -> dict:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    if not info:
        return "a run that left no details"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}" + (f" ({info['command']})" if info.get("command")
                                              else ""))


def acquire(run_dir: Path | str, command: str | None = None) -> RunLock:
    """Take ``<run_dir>/.mer.lock`` for this process (re-entrant within the process).

    Raises:
        RunDirLocked: another live run holds the folder (its pid, host and start time named).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        return _HELD[run_dir]
    from mer.data.io import describe_write_error

    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                dead = holder.get("host") == socket.gethostname() and \
                    isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
                raise RunDirLocked(
                    f"run folder {run_dir} is in use by another run: {_describe(holder)}"
                    + (" (that process has ended, but a process it started still holds the "
                       "lock: stop it)" if dead else "")
                    + ". Two runs in one folder would mix their outputs: give this run its "
                    "own hydra.run.dir (the default adds a timestamp), or wait for that one "
                    f"to finish: the lock ({path}) goes with its process."
                ) from None
            # the holder may have removed the file between our open and our flock
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning("taking over the lock of %s left by %s, which is no longer running",
                        run_dir, _describe(stale))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": command}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except RunDirLocked:
        raise
    except OSError as e:
        err = describe_write_error(path, e)
        raise (err or e) from e
    lock = RunLock(run_dir, fd, info)
    _HELD[run_dir] = lock
    return lock


def release(run_dir: Path | str) -> None:
    """Release this process's lock on ``run_dir``, if it holds one."""
    lock = _HELD.get(Path(run_dir).resolve())
    if lock is not None:
        lock.release()


@contextlib.contextmanager
def hold(run_dir: Path | str, command: str | None = None) -> Iterator[RunLock]:
    """Hold the run folder while inside; released after, unless it was already held (by the
    Hydra callback, which releases it at the end of the run)."""
    held_before = Path(run_dir).resolve() in _HELD
    lock = acquire(run_dir, command)
    try:
        yield lock
    finally:
        if not held_before:
            lock.release()


def one_run_per_folder(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate a Hydra task function (under ``@hydra.main``): it runs holding the lock of
    its output folder (``hydra.runtime.output_dir``), with SIGTERM raising
    :class:`~mer.engine.workers.Terminated` so that the run unwinds (workers stopped, the lock
    released, saved work kept for ``resume=true``); the process then exits at once with
    status 143 (the interpreter's own teardown of torch & co. takes seconds)."""

    @functools.wraps(task)
    def locked(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig

        from mer.engine.workers import Terminated, terminate_on_signal

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        overrides = " ".join(str(o) for o in HydraConfig.get().overrides.task)
        try:
            with hold(run_dir, overrides), terminate_on_signal():
                return task(cfg)
        except Terminated as e:
            log.error("%s (run folder %s)", e, run_dir)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(e.code)

    return locked


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[assignment,misc]


class RunDirLock(_HydraCallback):
    """Hydra callback: lock ``hydra.run.dir`` before Hydra writes anything into it."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf, open_dict, read_write

        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
        # pin the folder (its ${now:...} resolved once) so Hydra writes where the lock is
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(run_dir)
        try:
            acquire(run_dir, command=" ".join(str(o) for o in config.hydra.overrides.task))
        except RunDirLocked as e:  # Hydra turns a callback's Exception into a warning
            raise SystemExit(f"mer: {e}") from None

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        release(Path(str(OmegaConf.select(config, "hydra.run.dir"))))
