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
refused run, or a folder that cannot be made (read-only, disk full, below a file), exits
(status 2, ``mer: <reason>`` on stderr) before it writes anything into the folder. Multirun
jobs (and runs started without the callback) take it at the top of ``mer.run.main``: there a
refused job may have rewritten ``.hydra/`` of the folder already, but never
``results.json``, which always holds its own run's resolved config. The lock is released
when the task function ends, however it ends (finished, a mer error with exit 2, SIGTERM or
Ctrl-C).

:func:`one_run_per_folder` is also where the run's last words are decided: SIGTERM/SIGINT
print how to resume (exit 143/130, no traceback); an ``OSError`` of a full or read-only disk
that reaches it without a path (Lightning's CSV logger in a fold worker raises a bare
``[Errno 28]``) becomes a :class:`~mer.data.io.WriteError` naming the folder it was written
under; and a log file that cannot be written (Hydra's ``<run dir>/<job>.log`` on a full disk)
is one warning on stderr, not a traceback per log record.
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


def live_holder(run_dir: Path | str) -> dict | None:
    """The details (pid, host, started, command) of the run that holds ``run_dir`` now; None
    when no lock file is there or its process has ended (read only: the lock is not touched).
    A holder on another host cannot be checked and counts as live."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
            and not _alive(info["pid"]):
        return None
    return info


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


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _fs_state(folder: Path) -> tuple[bool, bool]:
    """(nearly full, read-only) of the file system holding ``folder`` (or its nearest
    existing parent)."""
    for f in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(f)
            return st.f_bavail * st.f_frsize < 1 << 20, bool(st.f_flag & os.ST_RDONLY)
    return False, False


def disk_error(exc: BaseException, run_dir: Path, other_dirs: tuple[Path, ...] = ()
               ) -> OSError | None:
    """The :class:`~mer.data.io.WriteError` for a raw ``OSError`` of a full, over-quota or
    read-only disk (or a file-size limit); None for anything else, and for mer's own errors.

    With the error's own path, that path is named. Without one (Lightning's CSV logger in a
    fold worker: ``OSError: [Errno 28] No space left on device``), the folder it was written
    under is named: of ``run_dir`` and ``other_dirs`` (the cache), the one whose file system
    is full (or read-only); ``run_dir`` when none is."""
    from mer.cli import is_user_error
    from mer.data.io import WriteError, describe_write_error

    if not isinstance(exc, OSError) or is_user_error(exc) or exc.errno not in _DISK_ERRNOS:
        return None
    if exc.filename:
        return describe_write_error(exc.filename, exc)
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    folder = run_dir
    for d in (run_dir, *other_dirs):
        nearly_full, read_only = _fs_state(Path(d))
        if (nearly_full if full else read_only if exc.errno == errno.EROFS else False):
            folder = Path(d)
            break
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk full (quota exceeded)",
            errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}[exc.errno]
    fix = ("choose a writable place for the outputs (hydra.run.dir=..., paths.cache_dir=...)"
           if exc.errno == errno.EROFS else
           f"free space on the file system of {folder} (or write elsewhere, e.g. another "
           "hydra.run.dir)" if full else "raise the file-size limit (ulimit -f)")
    return WriteError(folder, f"{what}: could not write under {folder} ({exc}; the writer, "
                      "e.g. Lightning's logger or checkpoint, named no file); " + fix +
                      f", then rerun with resume=true (same hydra.run.dir): finished work in "
                      f"{run_dir} is kept", exc.errno)


class _LogFileGuard:
    """Log files (``logging.FileHandler`` of the root logger) that fail to write: one warning
    on stderr naming the file, then the handler is muted, instead of logging's
    '--- Logging error ---' traceback for every record."""

    def __init__(self) -> None:
        self.patched: list[logging.Handler] = []

    def __enter__(self) -> _LogFileGuard:
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.FileHandler) and "handleError" not in vars(h):
                h.handleError = functools.partial(self._failed, h)  # type: ignore[method-assign]
                self.patched.append(h)
        return self

    @staticmethod
    def _failed(handler: logging.FileHandler, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            return logging.FileHandler.handleError(handler, record)
        from mer.data.io import describe_write_error

        err = describe_write_error(handler.baseFilename, exc) or exc
        handler.setLevel(logging.CRITICAL + 1)  # muted: the run goes on, logging to stdout
        with contextlib.suppress(Exception):
            print(f"mer: warning: the log file cannot be written, logging to it stopped: {err}",
                  file=sys.stderr, flush=True)
        return None

    def __exit__(self, *exc: object) -> None:
        for h in self.patched:
            vars(h).pop("handleError", None)


def _last_words(message: str) -> None:
    """``message`` on stderr (``mer: ...``) and into the run's log files (not the console
    again)."""
    print(f"mer: {message}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            with contextlib.suppress(Exception):
                h.handle(record)


RESUME_HINT = "rerun with resume=true to continue from {run_dir}"


def one_run_per_folder(task: Callable[[Any], Any] | None = None, *, hint: str = RESUME_HINT
                       ) -> Any:
    """Decorate a Hydra task function (under ``@hydra.main``): it runs holding the lock of
    its output folder (``hydra.runtime.output_dir``), released when it ends, however it ends.

    - SIGTERM (SLURM) and SIGINT (Ctrl-C) raise :class:`~mer.engine.workers.Terminated` so
      that the run unwinds (workers stopped, saved work kept); ``interrupted; rerun with
      resume=true to continue from <run dir>`` goes to stderr and the process exits at once
      with status 130 (SIGINT) or 143 (SIGTERM), without a traceback (the interpreter's own
      teardown of torch & co. takes seconds).
    - A raw ``OSError`` of a full or read-only disk becomes a WriteError (:func:`disk_error`),
      which :func:`mer.cli.user_errors_exit` prints.
    - A run log file that cannot be written is one warning (:class:`_LogFileGuard`).

    ``hint`` (``{run_dir}``, ``{cache_dir}`` filled in) is what follows ``interrupted; `` when
    the run is stopped: ``mer.prepare`` says its cache keeps the prepared clips. Use as
    ``@one_run_per_folder`` or ``@one_run_per_folder(hint=...)``."""
    if task is None:
        return functools.partial(one_run_per_folder, hint=hint)

    @functools.wraps(task)
    def locked(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from mer.engine.workers import Terminated, terminate_on_signal

        run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
        overrides = " ".join(str(o) for o in HydraConfig.get().overrides.task)
        cache = OmegaConf.select(cfg, "paths.cache_dir", default=None) \
            if OmegaConf.is_config(cfg) else None
        try:
            with _LogFileGuard(), hold(run_dir, overrides), terminate_on_signal():
                return task(cfg)
        except Terminated as e:
            release(run_dir)
            _last_words(f"{e.what}; " + hint.format(run_dir=run_dir, cache_dir=cache))
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(e.code)
        except OSError as e:
            err = disk_error(e, run_dir, (Path(cache),) if cache else ())
            if err is None:
                raise
            raise err from e
        finally:
            release(run_dir)  # the Hydra callback's lock too: Hydra skips on_run_end on exit

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
        except Exception as e:  # Hydra turns a callback's Exception into a warning
            from mer.cli import USER_ERROR_STATUS, is_user_error

            if not (isinstance(e, RunDirLocked) or is_user_error(e)):
                raise
            print(f"mer: {e}", file=sys.stderr, flush=True)  # in use, read-only, disk full
            raise SystemExit(USER_ERROR_STATUS) from None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """Make ``hydra.sweep.dir`` now (its ``${now:...}`` pinned), so that a folder that
        cannot be made is a ``mer:`` error rather than a traceback from Hydra's sweeper. Each
        job locks its own folder in :func:`one_run_per_folder`."""
        from omegaconf import OmegaConf, open_dict, read_write

        from mer.data.io import describe_write_error

        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(sweep_dir)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            err = describe_write_error(sweep_dir, e)
            if err is None:
                raise
            print(f"mer: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        release(Path(str(OmegaConf.select(config, "hydra.run.dir"))))
