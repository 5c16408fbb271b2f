"""Federated LOSO folds in worker processes (``federated.protocol.workers``): the same result
as in turn at the same thread count, resumable from ``folds_done/``, stopped by SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples
from omegaconf import open_dict

import mer.federated.protocols as protocols
from mer.federated.protocols import run_loso


def _cfg(workers, resume=False, rounds=1, **federated):
    cfg = fed_cfg(rounds=rounds, **federated)
    with open_dict(cfg):
        cfg.federated.protocol = {"kind": "loso", "workers": workers}
        cfg.resume = resume
    return cfg


def _same(a: dict, b: dict) -> None:
    assert a["predictions"]["index"] == b["predictions"]["index"]
    for kind, p in a["predictions"]["pred"].items():
        np.testing.assert_array_equal(np.asarray(p), np.asarray(b["predictions"]["pred"][kind]))
    assert a["final"] == b["final"] and a["per_fold"] == b["per_fold"]


def test_parallel_folds_equal_folds_in_turn(one_thread, tmp_path, monkeypatch):
    s = toy_samples(n_db=2, n_subjects=3, learnable=True)
    settings = {"rule": {"name": "fedprox"}, "mu": 0.1, "personalise": {"own": 0.9}}
    turn = run_loso(_cfg(1, **settings), s, tmp_path / "turn", show_progress=False)
    real = protocols._fold_in_worker
    pids = tmp_path / "pids"
    pids.mkdir()

    def spy(subject, fold_clients):  # records which process trained each fold
        (pids / subject.replace("/", "_")).write_text(str(os.getpid()))
        return real(subject, fold_clients)

    spy.__module__, spy.__qualname__ = protocols.__name__, "_fold_in_worker"  # pickled by name
    monkeypatch.setattr(protocols, "_fold_in_worker", spy)
    parallel = run_loso(_cfg(2, **settings), s, tmp_path / "parallel", show_progress=False)
    _same(turn, parallel)
    assert len(list((tmp_path / "parallel" / "folds_done").glob("*.pt"))) == 6
    workers = {int(f.read_text()) for f in pids.iterdir()}
    assert len(list(pids.iterdir())) == 6 and os.getpid() not in workers and len(workers) >= 1


def test_resume_loads_finished_folds_and_trains_the_rest(one_thread, tmp_path, monkeypatch):
    s = toy_samples(n_db=2, n_subjects=3, learnable=True)
    first = run_loso(_cfg(1), s, tmp_path, show_progress=False)
    done = sorted((tmp_path / "folds_done").glob("*.pt"))
    assert len(done) == 6
    done[2].unlink()  # that fold was not finished when the run stopped
    trained = []
    real = protocols.run_federated

    def counting(cfg, samples, clients, checkpoint_dir, show_progress=True):
        trained.append(Path(checkpoint_dir).name)
        return real(cfg, samples, clients, checkpoint_dir, show_progress)

    monkeypatch.setattr(protocols, "run_federated", counting)
    resumed = run_loso(_cfg(1, resume=True), s, tmp_path, show_progress=False)
    assert trained == [done[2].stem]
    _same(first, resumed)
    # another recipe (2 rounds) is not taken from the saved folds: every fold trains again
    trained.clear()
    run_loso(_cfg(1, resume=True, rounds=2), s, tmp_path, show_progress=False)
    assert len(trained) == 6


@pytest.mark.slow
def test_sigterm_stops_the_fold_workers_and_keeps_finished_folds(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from fedtoys import fed_cfg, toy_samples
        from omegaconf import open_dict
        from mer.federated.protocols import run_loso
        cfg = fed_cfg(rounds=3, local_epochs=3)
        with open_dict(cfg):
            cfg.federated.protocol = {{"kind": "loso", "workers": 2}}
        run_loso(cfg, toy_samples(n_db=2, n_subjects=4, learnable=True), Path(sys.argv[1]),
                 show_progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    done_dir = tmp_path / "folds_done"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and \
            not (done_dir.exists() and any(done_dir.glob("*.pt"))):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(done_dir.glob("*.pt"))
    assert 1 <= len(saved) < 8
    # no worker left behind in the run's process group
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == ""
