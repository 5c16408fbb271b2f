"""Runs that fail safely, end to end as a user (or SLURM) runs them: ``python -m mer.run`` in
a subprocess on tiny SynME. SIGTERM stops every process of a run at once and leaves it
resumable to the uninterrupted result; two runs never share a run folder; the scores in
results.json are sklearn's on predictions.csv."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

LOSO = ["+experiment=synme_ststnet", "data.preset=tiny", "trainer.max_epochs=60",
        "protocol.workers=2"]
FED = ["+experiment=fed_psyau", "data.preset=tiny", "model=ststnet", "federated=fedavg",
       "federated.workers=2", "federated.rounds=5", "federated.eval_every=5",
       "federated.local_epochs=40", "federated.baselines=false", "logger=csv"]


def command(args: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mer.run", *args, f"hydra.run.dir={run_dir}", "progress=false"]


def run_mer(args: list[str], run_dir: Path) -> dict:
    proc = subprocess.run(command(args, run_dir), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    """A run in its own process group (as a SLURM job step is), output to files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command(args, run_dir), start_new_session=True,
                            stdout=open(run_dir.parent / f"{run_dir.name}.out", "w"),
                            stderr=open(run_dir.parent / f"{run_dir.name}.err", "w"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the wait"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def terminate(proc: subprocess.Popen, group: bool) -> tuple[list[psutil.Process], int | None]:
    """SIGTERM the run's group (or its main process alone); what is still alive 5 s later
    (killed afterwards, so that a failing test leaves nothing behind) and the main's status."""
    main = psutil.Process(proc.pid)
    procs = [main, *main.children(recursive=True)]
    assert len(procs) >= 3, "expected the main process and its 2 workers"
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        rc = None
    _, alive = psutil.wait_procs(procs[1:], timeout=5)
    alive += [p for p in group_members(proc.pid) if p not in alive]
    for p in alive + ([main] if rc is None else []):
        try:
            p.kill()
        except psutil.Error:
            pass
    return alive, rc


def assert_same_predictions(a: Path, b: Path) -> None:
    pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    assert list(pa.columns) == list(pb.columns) and len(pa) == len(pb)
    for col in pa.columns:
        if pa[col].dtype.kind == "f":
            np.testing.assert_allclose(pa[col], pb[col], atol=1e-5, err_msg=col)
        else:
            assert (pa[col] == pb[col]).all(), col


@pytest.fixture(scope="module")
def loso_full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loso") / "full"
    return run_dir, run_mer(LOSO, run_dir)


@pytest.fixture(scope="module")
def fed_full(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fed") / "full"
    return run_dir, run_mer(FED, run_dir)


@pytest.mark.parametrize("group", [True, False], ids=["group", "main-only"])
def test_sigterm_stops_fold_workers_and_resume_gives_the_full_run(group, loso_full, tmp_path):
    full_dir, full = loso_full
    run_dir = tmp_path / "cut"
    proc = start(LOSO, run_dir)
    wait_for(lambda: any((run_dir / "folds_done").glob("*.npz")), proc)
    alive, rc = terminate(proc, group)
    assert alive == [], f"still running 5 s after SIGTERM: {alive}"
    assert rc is not None and rc != 0  # a terminated run does not report success
    saved = sorted(p.name for p in (run_dir / "folds_done").iterdir())
    assert saved and all(n.endswith(".npz") and not n.startswith(".") for n in saved), saved
    assert len(saved) < full["protocol"]["folds"], "the run finished before SIGTERM"
    assert not (run_dir / "results.json").exists()

    resumed = run_mer([*LOSO, "resume=true"], run_dir)
    assert sorted(resumed["protocol"]["resumed_folds"]) == \
        sorted(n[:-4].replace("_", "/", 1) for n in saved)
    for key in ("uf1", "uar", "accuracy"):
        assert resumed["metrics"]["overall"][key] == pytest.approx(
            full["metrics"]["overall"][key], abs=1e-9)
    assert_same_predictions(full_dir, run_dir)


@pytest.mark.parametrize("group", [True, False], ids=["group", "main-only"])
def test_sigterm_stops_federated_workers_and_resume_gives_the_full_run(group, fed_full,
                                                                       tmp_path):
    full_dir, full = fed_full
    run_dir = tmp_path / "cut"
    proc = start(FED, run_dir)
    ckpt = run_dir / "checkpoints" / "seed42" / "federated_state.pt"
    wait_for(ckpt.exists, proc)
    time.sleep(0.3)  # into the next round's local training (2 s of the round's ~2 s)
    alive, rc = terminate(proc, group)
    assert alive == [], f"still running 5 s after SIGTERM: {alive}"
    assert rc is not None and rc != 0
    assert not (run_dir / "results.json").exists()
    assert [p.name for p in ckpt.parent.iterdir()] == ["federated_state.pt"]  # no temp file

    resumed = run_mer([*FED, "resume=true"], run_dir)
    assert resumed["federated"]["resumed_after_round"] >= 1
    final, want = resumed["federated"]["final"], full["federated"]["final"]
    for kind in ("pooled_global", "pooled_personalised"):
        assert final[kind] == want[kind]
    assert_same_predictions(full_dir, run_dir)


def test_scores_in_results_are_sklearns_on_predictions_csv(loso_full, fed_full):
    from sklearn.metrics import f1_score, recall_score

    def scores(y, p):
        return (f1_score(y, p, average="macro", zero_division=0),
                recall_score(y, p, average="macro", zero_division=0))

    run_dir, results = loso_full
    pred = pd.read_csv(run_dir / "predictions.csv")
    uf1, uar = scores(pred["label"], pred["prediction"])
    assert results["metrics"]["overall"]["uf1"] == pytest.approx(uf1, abs=1e-12)
    assert results["metrics"]["overall"]["uar"] == pytest.approx(uar, abs=1e-12)
    for db, g in pred.groupby("database"):
        m = results["metrics"]["per_database"][db]
        assert (m["uf1"], m["uar"]) == pytest.approx(scores(g["label"], g["prediction"]))
    probs = pred[[f"p_{c}" for c in results["data"]["class_names"]]].to_numpy()
    assert (probs.argmax(1) == pred["prediction"]).all()

    run_dir, results = fed_full
    pred = pd.read_csv(run_dir / "predictions.csv")
    final = results["federated"]["final"]
    for kind in ("global", "personalised"):
        uf1, uar = scores(pred["label"], pred[f"pred_{kind}"])
        assert final[f"pooled_{kind}"]["uf1"] == pytest.approx(uf1, abs=1e-12)
        assert final[f"pooled_{kind}"]["uar"] == pytest.approx(uar, abs=1e-12)
        assert final[f"pooled_{kind}"]["n"] == len(pred)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    run_dir = tmp_path / "shared"
    first = start([*LOSO, "seed=1"], run_dir)
    wait_for(lambda: (run_dir / ".hydra" / "config.yaml").exists() and
             any((run_dir / "logs").rglob("*.csv")), first)
    second = subprocess.run(command([*LOSO, "seed=2", "trainer.max_epochs=1"], run_dir),
                            capture_output=True, text=True, timeout=600)
    try:
        assert second.returncode != 0, "the second run was let into the folder"
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr, \
            second.stderr[-2000:]
        assert first.wait(timeout=600) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    results = json.loads((run_dir / "results.json").read_text())
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert results["config"]["seed"] == hydra_cfg["seed"] == 1  # both the first run's
    assert not (run_dir / ".mer.lock").exists()  # released at exit
    # the folder is free again: a later run (e.g. resume=true) gets in
    again = run_mer([*LOSO, "seed=1", "resume=true"], run_dir)
    assert sorted(again["protocol"]["resumed_folds"]) == sorted(
        results["metrics"]["per_fold"])


def test_ctrl_c_stops_the_workers_and_says_how_to_resume(tmp_path):
    """SIGINT to the whole group, as Ctrl-C in a terminal sends it: no traceback, 'interrupted;
    rerun with resume=true to continue from <run dir>', exit 130, no process left, the lock
    released, finished folds kept (and used by resume=true)."""
    run_dir = tmp_path / "cut"
    run_dir.mkdir()
    err_path = tmp_path / "cut.err"
    proc = subprocess.Popen(  # as from a terminal: SIGINT not ignored even under `cmd &`
        command(LOSO, run_dir), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(err_path, "w"), preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                     signal.SIG_DFL))
    wait_for(lambda: any((run_dir / "folds_done").glob("*.npz")), proc)
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(timeout=30)  # seconds in practice; a loaded machine is slower
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _, alive = psutil.wait_procs(procs[1:], timeout=5)
        for p in [*alive, *group_members(proc.pid)]:
            p.kill()
    err = err_path.read_text()
    assert rc == 130, err[-3000:]
    assert f"interrupted; rerun with resume=true to continue from {run_dir}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert alive == [], f"still running 5 s after Ctrl-C: {alive}"
    assert not (run_dir / ".mer.lock").exists()
    saved = list((run_dir / "folds_done").glob("*.npz"))
    resumed = run_mer([*LOSO, "resume=true"], run_dir)
    assert len(resumed["protocol"]["resumed_folds"]) == len(saved) > 0
