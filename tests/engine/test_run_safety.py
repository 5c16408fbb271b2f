"""Runs that fail safely: corrupt files named with what to delete, disk full / read-only
outputs named, no half-written files, NaN refused where data and predictions cross a boundary,
classes absent from the ground truth reported. Fast tests on tiny in-memory data; the
subprocess ones (SIGTERM, the run-folder lock) are in test_run_safety_e2e.py."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mer.data.samples import FlowSamples
from mer.engine.metrics import recognition_metrics
from mer.engine.protocols import loso_folds, run_folds
from mer.engine.report import write_outputs

CLASSES = ["negative", "positive", "surprise"]


def tiny_samples(n_db: int = 2, n_subjects: int = 2, per_subject: int = 3) -> FlowSamples:
    rng = np.random.default_rng(0)
    rows = [{"database": f"db{d}", "subject": f"sub{s:02d}", "clip": f"EP{c:02d}",
             "label": (s + c) % 3} for d in range(n_db) for s in range(n_subjects)
            for c in range(per_subject)]
    x = rng.random((len(rows), 3, 28, 28), dtype=np.float32)
    return FlowSamples(x, pd.DataFrame(rows), list(CLASSES))


SPEC = {
    "model": {"name": "ststnet", "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam",
              "kwargs": {}},
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "deterministic": True},
    "batch_size": 8, "shuffle": False, "seed": 3, "select": "last", "log_dir": None,
}


def fed_cfg(rounds: int = 1) -> object:
    """A tiny in-process federated config (STSTNet, FedAvg, one local epoch)."""
    return OmegaConf.create({
        "seed": 0, "resume": True, "data": {"batch_size": 8, "shuffle": False},
        "trainer": {"accelerator": "cpu", "devices": 1, "deterministic": True},
        "model": {"name": "ststnet", "lr": 1e-2, "weight_decay": 0.0, "optimizer": "adam",
                  "kwargs": {}},
        "federated": {"rule": {"name": "fedavg"}, "mu": 0.0, "personalise": None,
                      "server_opt": {"name": "sgd", "lr": 1.0, "momentum": 0.0},
                      "rounds": rounds, "eval_every": 1, "local_epochs": 1, "fraction": 1.0,
                      "min_clients": 1, "faults": {}, "num_clients": None, "baselines": False,
                      "partition": {"kind": "natural", "test_fraction": 0.5}},
    })


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def leftovers(folder) -> list[str]:
    """Files in ``folder`` (recursively) that look like temporary or partial writes."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and ("tmp" in p.name or p.name.startswith(".")))


@pytest.fixture
def disk_full(monkeypatch):
    """Every file opened for writing under the returned folder fails with ENOSPC after its
    first few bytes, as a full disk does (``open``, ``io.open`` and so pathlib/pandas/numpy)."""

    def arm(root):
        real_open = builtins.open

        class Full(io.RawIOBase):
            def __init__(self, f):
                self.f, self.written = f, 0

            def write(self, b):
                if self.written >= 16:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n = self.f.write(bytes(b[:16 - self.written]))
                self.written += n
                return n

            def writable(self):
                return True

            def close(self):
                self.f.close()
                super().close()

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(root)) \
                    and any(c in mode for c in "wax+"):
                raw = Full(real_open(file, "wb"))
                buffered = io.BufferedWriter(raw)
                return buffered if "b" in mode else io.TextIOWrapper(buffered,
                                                                encoding="utf-8")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return arm


# ---------------------------------------------------------------------------------------------
# Corrupt files mer wrote: named, with what to delete


def test_truncated_saved_fold_is_named_on_resume(tmp_path):
    samples = tiny_samples()
    folds = loso_folds(samples)[:2]
    run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path)
    saved = tmp_path / "db0_sub00.npz"
    truncate(saved)
    with pytest.raises(Exception) as err:
        run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path,
                  resume=True)
    msg = str(err.value)
    assert type(err.value).__name__ == "CorruptFileError", msg
    assert str(saved) in msg and "truncated or corrupt" in msg and "delete it" in msg


def test_bit_flip_in_saved_fold_is_caught_by_the_checksum(tmp_path):
    samples = tiny_samples()
    folds = loso_folds(samples)[:1]
    first = run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path)
    saved = tmp_path / "db0_sub00.npz"
    data = bytearray(saved.read_bytes())
    data[-40] ^= 0xFF  # a zip file may still open after this; the checksum must not
    saved.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum") as err:
        run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path,
                  resume=True)
    assert type(err.value).__name__ == "CorruptFileError"
    saved.unlink()  # what the message says to do: the fold is trained again, same result
    again = run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path,
                      resume=True)
    np.testing.assert_allclose(first[0]["probs"], again[0]["probs"], atol=1e-6)


def test_truncated_federated_checkpoint_is_named(tmp_path):
    from mer.federated.loop import FederatedRun, make_clients

    samples, cfg = tiny_samples(n_subjects=4, per_subject=2), fed_cfg()
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients, tmp_path)
    run.run_rounds()
    ckpt = tmp_path / "federated_state.pt"
    assert ckpt.exists() and leftovers(tmp_path) == []
    truncate(ckpt)
    with pytest.raises(Exception) as err:
        FederatedRun(cfg, samples, clients, tmp_path).try_resume()
    msg = str(err.value)
    assert type(err.value).__name__ == "CorruptFileError", msg
    assert str(ckpt) in msg and "delete it to start the federated run from round 0" in msg


def test_federated_checkpoint_round_trips(tmp_path):
    from mer.federated.loop import FederatedRun, make_clients

    samples, cfg = tiny_samples(n_subjects=4, per_subject=2), fed_cfg()
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients, tmp_path)
    run.run_rounds()
    again = FederatedRun(cfg, samples, clients, tmp_path)
    assert again.try_resume() and again.round_done == 1
    for a, b in zip(run.global_weights, again.global_weights):
        np.testing.assert_array_equal(a, b)
    assert again.curves == run.curves


# ---------------------------------------------------------------------------------------------
# Disk full / read-only: the path and the cause named, nothing half-written left


def _results() -> tuple[dict, pd.DataFrame]:
    predictions = pd.DataFrame({"label": [0, 1, 2], "prediction": [0, 1, 1],
                                "database": "db0", "fold": "db0/sub00"})
    results = {"name": "t", "data": {"synthetic": True},
               "metrics": {"overall": recognition_metrics([0, 1, 2], [0, 1, 1], CLASSES)}}
    return results, predictions


def test_disk_full_on_results_names_the_path_and_leaves_nothing(tmp_path, disk_full):
    results, predictions = _results()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    disk_full(run_dir)
    with pytest.raises(OSError) as err:
        write_outputs(run_dir, results, predictions, CLASSES)
    msg = str(err.value)
    assert type(err.value).__name__ == "WriteError" and err.value.errno == errno.ENOSPC, msg
    assert str(run_dir / "predictions.csv") in msg and "disk full" in msg  # the first file
    assert list(run_dir.iterdir()) == []  # no partial file, no temp file, no results.json


def test_disk_full_on_federated_checkpoint(tmp_path, disk_full):
    from mer.federated.loop import FederatedRun, make_clients

    samples, cfg = tiny_samples(n_subjects=4, per_subject=2), fed_cfg()
    run = FederatedRun(cfg, samples, make_clients(cfg, samples), tmp_path / "ck")
    disk_full(tmp_path / "ck")
    with pytest.raises(OSError, match="disk full") as err:
        run.run_rounds()
    assert str(tmp_path / "ck" / "federated_state.pt") in str(err.value)
    assert leftovers(tmp_path / "ck") == [] and not (tmp_path / "ck/federated_state.pt").exists()


def test_disk_full_on_a_saved_fold(tmp_path, disk_full):
    samples = tiny_samples()
    folds = loso_folds(samples)[:1]
    (tmp_path / "done").mkdir()
    disk_full(tmp_path / "done")
    with pytest.raises(OSError, match="disk full") as err:
        run_folds(samples, folds, SPEC, workers=1, show_progress=False,
                  done_dir=tmp_path / "done")
    assert "db0_sub00.npz" in str(err.value)
    assert list((tmp_path / "done").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir_is_named(tmp_path):
    results, predictions = _results()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        with pytest.raises(OSError, match="permission denied") as err:
            write_outputs(run_dir, results, predictions, CLASSES)
        assert str(run_dir / "predictions.csv") in str(err.value)
    finally:
        run_dir.chmod(0o700)
    assert list(run_dir.iterdir()) == []


def test_outputs_are_complete_and_parse(tmp_path):
    results, predictions = _results()
    write_outputs(tmp_path, results, predictions, CLASSES)
    assert json.loads((tmp_path / "results.json").read_text())["name"] == "t"
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "predictions.csv"), predictions)
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# NaN at the data and evaluation boundaries


def test_non_finite_flow_is_refused_naming_the_sample():
    samples = tiny_samples()
    x = samples.x.copy()
    x[4, 1, 3, 3] = np.nan
    x[7, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite") as err:
        FlowSamples(x, samples.meta, list(CLASSES))
    msg = str(err.value)
    assert "db0/sub01/EP01" in msg and "db1/sub00/EP01" in msg and "2 samples" in msg


def test_nan_probabilities_of_a_fold_are_refused(monkeypatch):
    from mer.engine.module import MERModule

    monkeypatch.setattr(MERModule, "predict_step",
                        lambda self, batch, i, d=0: torch.full((len(batch[0]), 3), float("nan")))
    samples = tiny_samples()
    folds = loso_folds(samples)[:1]
    with pytest.raises(ValueError) as err:
        run_folds(samples, folds, SPEC, workers=1, show_progress=False)
    msg = str(err.value)
    assert "fold db0/sub00" in msg and "NaN" in msg and "EP00" in msg and "model.lr" in msg


def test_pooled_predictions_refuse_nan_from_a_saved_fold():
    from mer.engine.runner import pooled_predictions

    samples = tiny_samples()
    folds = loso_folds(samples)[:2]
    probs = [np.full((len(f.test_idx), 3), 1 / 3, np.float32) for f in folds]
    probs[1][2, 0] = np.nan
    results = [{"fold": f.name, "probs": p} for f, p in zip(folds, probs)]
    with pytest.raises(ValueError, match="fold db0/sub01 .*NaN.*db0/sub01/EP02"):
        pooled_predictions(samples, folds, results)


def test_federated_evaluate_refuses_nan_naming_client_and_clip(monkeypatch):
    from mer.federated.loop import FederatedRun, make_clients

    samples, cfg = tiny_samples(n_subjects=4, per_subject=2), fed_cfg()
    run = FederatedRun(cfg, samples, make_clients(cfg, samples))
    monkeypatch.setattr(run, "predict",
                        lambda w, c: np.full((len(c.test_idx), 3), np.nan, np.float32))
    with pytest.raises(ValueError) as err:
        run.evaluate()
    msg = str(err.value)
    assert "client db0" in msg and "global model" in msg and "NaN" in msg
    first = samples.meta.iloc[run.clients[0].test_idx[0]]
    assert f"{first['subject']}/{first['clip']}" in msg


# ---------------------------------------------------------------------------------------------
# Classes absent from the ground truth


def test_absent_classes_are_recorded_and_match_sklearn():
    from sklearn.metrics import f1_score, recall_score

    y_true, y_pred = np.array([0, 0, 1, 1, 0]), np.array([0, 1, 1, 1, 2])
    m = recognition_metrics(y_true, y_pred, CLASSES)
    assert m["absent_classes"] == ["surprise"]  # predicted once, never true
    assert m["uf1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["uar"] == pytest.approx(recall_score(y_true, y_pred, average="macro",
                                                  zero_division=0))
    assert recognition_metrics([0, 1, 2], [0, 1, 2], CLASSES)["absent_classes"] == []


def test_summary_warns_about_absent_classes(tmp_path, capsys):
    from mer.engine.runner import _print_summary

    m = recognition_metrics([0, 0, 1], [0, 1, 1], CLASSES)
    results = {"name": "t", "synthetic": False, "protocol": {"name": "loso", "folds": 2},
               "metrics": {"overall": m, "per_database": {"db0": m}}}
    _print_summary(results, tmp_path)
    out = capsys.readouterr().out
    assert "surprise" in out and "absent" in out


def test_a_saved_fold_copied_over_another_is_refused(tmp_path):
    """A valid fold file copied under another fold's name is not resumed as that fold."""
    samples = tiny_samples()
    folds = loso_folds(samples)[:2]
    run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path)
    first, second = (tmp_path / f"{_n}.npz" for _n in ("db0_sub00", "db0_sub01"))
    assert second.exists()
    second.write_bytes(first.read_bytes())
    with pytest.raises(Exception, match="holds fold 'db0/sub00', not 'db0/sub01'") as err:
        run_folds(samples, folds, SPEC, workers=1, show_progress=False, done_dir=tmp_path,
                  resume=True)
    assert type(err.value).__name__ == "CorruptFileError"


def test_mer_errors_reach_the_user_without_a_traceback(tmp_path):
    """mer.run prints mer's own errors as `mer: <message>` and exits 2; bugs keep their trace."""
    import subprocess
    import sys

    sheet = tmp_path / "CASME2-coding.xlsx"
    sheet.write_text("not a spreadsheet")
    proc = subprocess.run(
        [sys.executable, "-m", "mer.run", "data=casme2", f"data.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}", "progress=false"],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "MER_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"mer: annotation sheet {sheet} cannot be read" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_user_error_sorting():
    from mer.cli import is_user_error
    from mer.data.databases.common import DatabaseError
    from mer.data.io import WriteError

    assert is_user_error(DatabaseError("x")) and is_user_error(WriteError("/p", "disk full"))
    assert not is_user_error(ValueError("x")) and not is_user_error(KeyError("x"))
