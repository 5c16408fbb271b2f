"""What ``python -m mer.run`` shows when its run folder cannot be used or the run is stopped:
one ``mer: ...`` message (exit 2) naming the folder, never a raw OSError or a traceback; a
Ctrl-C that says how to resume (exit 130); no ``.mer.lock`` left after a refused config; disk
full inside a fold worker's logger named, with the run resumable."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mer.cli import user_errors_exit
from mer.engine.runlock import LOCK_NAME, one_run_per_folder
from mer.engine.workers import Terminated, terminate_on_signal

CONF = Path(__file__).resolve().parents[2] / "conf"


def mer_run(args: list[str], tmp_path: Path, prelude: str = "", timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """``python -m mer.run ARGS`` in a subprocess; ``prelude``: Python run first (to fake a
    file system), then mer.run as ``__main__``."""
    code = textwrap.dedent(prelude) + "\nimport runpy, sys\nsys.argv = ['mer.run', *sys.argv[1:]]" \
        "\nrunpy.run_module('mer.run', run_name='__main__', alter_sys=True)\n"
    env = {**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-c", code, *args, "progress=false"],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_mer_error(proc: subprocess.CompletedProcess, *named: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "OSError" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("mer: ")]
    assert len(lines) == 1, err[-3000:]
    for n in named:
        assert n in err, (n, err[-3000:])
    return err


# ------------------------------------------------------------------------- the run folder


READ_ONLY = """
import errno, os
RO = {ro!r}
_mkdir, _open = os.mkdir, os.open
def _refuse(path):
    if os.path.abspath(os.fsdecode(path)).startswith(RO + os.sep):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
def mkdir(path, *a, **k):
    _refuse(path)
    return _mkdir(path, *a, **k)
def open_(path, flags, *a, **k):
    if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
        _refuse(path)
    return _open(path, flags, *a, **k)
os.mkdir, os.open = mkdir, open_
"""


def test_read_only_run_folder_is_one_mer_error(tmp_path):
    """A run folder on a read-only file system: the lock cannot be made; Hydra used to turn
    that into a warning and then fail on its own mkdir with a raw OSError."""
    ro = tmp_path / "ro"
    ro.mkdir()
    run_dir = ro / "run"
    proc = mer_run(["data.preset=tiny", f"hydra.run.dir={run_dir}"], tmp_path,
                   READ_ONLY.format(ro=str(ro)))
    err = assert_one_mer_error(proc, f"{run_dir}", "read-only")
    assert "Warning" not in err and "Callback" not in err
    assert not run_dir.exists()


def test_run_folder_below_a_file_is_one_mer_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    run_dir = tmp_path / "afile" / "run"
    assert_one_mer_error(mer_run(["data.preset=tiny", f"hydra.run.dir={run_dir}"], tmp_path),
                         str(tmp_path / "afile"))


def test_sweep_folder_that_cannot_be_made_is_one_mer_error(tmp_path):
    """A multirun whose hydra.sweep.dir cannot be made (below a file; read-only): Hydra's
    sweeper used to fail on its mkdir with a traceback."""
    (tmp_path / "afile").write_text("x")
    sweep = tmp_path / "afile" / "sweep"
    assert_one_mer_error(mer_run(["-m", "data.preset=tiny", f"hydra.sweep.dir={sweep}"],
                                 tmp_path), str(sweep))
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = mer_run(["-m", "data.preset=tiny", f"hydra.sweep.dir={ro / 'sweep'}"], tmp_path,
                   READ_ONLY.format(ro=str(ro)))
    assert_one_mer_error(proc, str(ro / "sweep"), "read-only")


def test_config_error_releases_the_run_lock(tmp_path):
    """A run refused by the config check (exit 2) leaves no .mer.lock behind."""
    run_dir = tmp_path / "run"
    proc = mer_run(["data.preset=tiny", "data.batch_size=0", f"hydra.run.dir={run_dir}"],
                   tmp_path)
    assert proc.returncode == 2 and "data.batch_size" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / ".hydra").is_dir()  # Hydra started the run: the lock was taken
    assert not (run_dir / LOCK_NAME).exists()


def test_a_database_without_its_root_is_one_mer_error(tmp_path):
    run_dir = tmp_path / "run"
    proc = mer_run(["data=casme2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert_one_mer_error(proc, "data=casme2 needs data.root=")
    assert not (run_dir / LOCK_NAME).exists()


# ------------------------------------------------------------------------- in-process runs


@pytest.fixture
def hydra_run(tmp_path):
    """Sets Hydra's run config (as ``@hydra.main`` does) for a run folder; a task function
    wrapped like ``mer.run.main`` can then be called in this process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    run_dir = tmp_path / "run"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", f"hydra.run.dir={run_dir}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    yield cfg, run_dir
    HydraConfig.instance().cfg = None


def as_entry_point(task):
    return user_errors_exit(one_run_per_folder(task))


class FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC after ``room`` bytes (seekable, as fsspec wants)."""

    def __init__(self, f, room: int = 16) -> None:
        self.f, self.room = f, room

    def write(self, b):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.f.write(bytes(b[:self.room]))
        self.room -= n
        return n

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


def test_disk_full_in_a_fold_workers_csv_logger_is_named_and_resumable(hydra_run, monkeypatch,
                                                                       capsys):
    """Lightning's CSV logger hits a full disk in a fold worker (fork: the worker inherits the
    full disk): the OSError that comes back has no path. The entry point names the run folder
    and 'disk full' (mer: ..., exit 2, lock released); the run then resumes."""
    import builtins

    from test_run_safety import SPEC, loso_folds, tiny_samples

    from mer.engine.protocols import run_folds

    cfg, run_dir = hydra_run
    samples = tiny_samples()
    folds = loso_folds(samples)
    spec = {**SPEC, "log_dir": str(run_dir / "logs")}
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(spec["log_dir"]) \
                and any(c in mode for c in "wax+"):
            buffered = io.BufferedWriter(FullDisk(real_open(file, "wb")))
            return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8")
        return real_open(file, mode, *args, **kwargs)

    def task(_cfg):
        return run_folds(samples, folds, spec, workers=2, show_progress=False,
                         done_dir=run_dir / "folds_done", resume=True)

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    with pytest.raises(SystemExit) as exit_:
        as_entry_point(task)(cfg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("mer: disk full") and str(run_dir) in err and "resume=true" in err
    assert "Traceback" not in err
    assert not (run_dir / LOCK_NAME).exists()
    monkeypatch.setattr(builtins, "open", real_open)  # space freed
    monkeypatch.setattr(io, "open", real_open)
    results = as_entry_point(task)(cfg)
    assert [r["fold"] for r in results] == [f.name for f in folds]


def test_a_log_file_on_a_full_disk_is_one_warning_not_a_traceback(hydra_run, capsys):
    """Hydra's log file in the run folder fails on a full disk: logging used to print a
    '--- Logging error ---' traceback for every record; now one warning naming the file."""
    cfg, run_dir = hydra_run
    run_dir.mkdir(parents=True)
    handler = logging.FileHandler(run_dir / "mer.run.log")
    handler.stream = io.TextIOWrapper(io.BufferedWriter(FullDisk(open(os.devnull, "wb"), 0)))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        def task(_cfg):
            for i in range(3):
                logging.getLogger("mer.test").warning("record %d", i)
            return 1.0

        assert as_entry_point(task)(cfg) == 1.0
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert err.count(str(run_dir / "mer.run.log")) == 1 and "disk full" in err, err


# ------------------------------------------------------------------------- Ctrl-C


def test_sigint_raises_terminated_130():
    with pytest.raises(Terminated) as stop, terminate_on_signal():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert stop.value.code == 130 and str(stop.value).startswith("interrupted")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_says_how_to_resume_without_a_traceback(hydra_run, capsys):
    cfg, run_dir = hydra_run

    def task(_cfg):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        raise AssertionError("SIGINT did not stop the task")

    exits = []
    real_exit = os._exit
    try:
        os._exit = lambda code: (exits.append(code), (_ for _ in ()).throw(SystemExit(code)))
        with pytest.raises(SystemExit):
            as_entry_point(task)(cfg)
    finally:
        os._exit = real_exit
    err = capsys.readouterr().err
    assert exits == [130]
    assert f"interrupted; rerun with resume=true to continue from {run_dir}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not (run_dir / LOCK_NAME).exists()


def test_non_finite_probabilities_are_mers_own_error():
    """model.lr=1e30: the NaN refusal names the fold and clips; it is mer's own error (printed
    as `mer: ...`, exit 2), not a ValueError shown with a traceback."""
    import numpy as np
    from test_run_safety import tiny_samples

    from mer.cli import is_user_error
    from mer.engine.protocols import refuse_non_finite

    samples = tiny_samples()
    probs = np.full((2, 3), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="fold db0/sub00 produced NaN") as err:
        refuse_non_finite(probs, samples, np.array([0, 1]), "fold db0/sub00")
    assert is_user_error(err.value)
