"""The run-folder lock (mer.engine.runlock): one live run per folder, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from mer.engine.runlock import LOCK_NAME, RunDirLocked, acquire, hold


def try_from_another_process(run_dir) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom mer.engine.runlock import acquire\n"
            f"lock = acquire({str(run_dir)!r})\nprint(lock.info['pid'])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    lock = acquire(tmp_path / "run")
    try:
        info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert acquire(tmp_path / "run") is lock  # re-entrant within the process
        other = try_from_another_process(tmp_path / "run")
        assert other.returncode != 0
        assert "RunDirLocked" in other.stderr and f"pid {os.getpid()}" in other.stderr
        assert info["started"] in other.stderr and "hydra.run.dir" in other.stderr
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    free = try_from_another_process(tmp_path / "run")
    assert free.returncode == 0, free.stderr
    # that process exited without releasing: its lock file is left, stale, and taken over
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == int(free.stdout)


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING, logger="mer.engine.runlock"):
        with hold(run_dir) as lock:
            assert lock.info["pid"] == os.getpid()
            assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run_dir / LOCK_NAME).exists()


def test_refusal_is_a_clear_error_in_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mer.engine.runlock import acquire\n"
         f"acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on {socket.gethostname()}"):
            acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with hold(tmp_path):  # the holder died: the folder is free again
        pass
