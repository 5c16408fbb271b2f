"""`mer.collect` on folders it cannot pool: a half-written or foreign results.json, a run
without predictions.csv: a CollectError naming the file, never a raw JSON error."""

import json

import pytest

from mer.collect import CollectError, collect, main


def test_half_written_results_is_named(tmp_path):
    run = tmp_path / "0_model=ststnet"
    run.mkdir()
    (run / "results.json").write_text('{"name": "synme", "metrics": {"ove')
    with pytest.raises(CollectError, match=r"0_model=ststnet/results.json cannot be read"):
        collect([tmp_path])


def test_foreign_results_is_named(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(CollectError, match="is not a mer results.json"):
        collect([tmp_path])


def test_missing_predictions_is_named(tmp_path):
    results = {"name": "x", "config": {"model": {"name": "ststnet"}, "data": {"name": "synme"}},
               "data": {"class_names": ["a", "b"]}, "protocol": {}, "synthetic": True}
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(CollectError, match="no predictions.csv"):
        collect([tmp_path])


def test_no_results_at_all(tmp_path):
    with pytest.raises(CollectError, match="no results.json"):
        main([str(tmp_path)])


def test_parameter_count_and_seconds_per_fold_columns(tmp_path):
    """Each row names its network's size (built from the run's model config) and the mean
    training seconds of its folds, pooled over the runs of one experiment (one fold each)."""
    import pandas as pd

    from mer.models.registry import create_model

    model = {"name": "ststnet", "lr": 1e-3, "kwargs": {"dropout": 0.5}}
    for i, (fold, seconds) in enumerate([("db/s1", 2.0), ("db/s2", 5.0)]):
        run = tmp_path / f"{i}_protocol.fold_index={i}"
        run.mkdir()
        results = {"name": "x", "synthetic": True, "data": {"class_names": ["a", "b", "c"]},
                   "config": {"model": model, "data": {"name": "synme"},
                              "protocol": {"fold_index": i}},
                   "protocol": {"total_folds": 2}, "timings": {"folds_s": {fold: seconds}}}
        (run / "results.json").write_text(json.dumps(results))
        pd.DataFrame({"subject": [fold[-2:]], "clip": ["c"], "database": ["db"], "fold": [fold],
                      "label": [i], "prediction": [i]}).to_csv(run / "predictions.csv",
                                                               index=False)
    row = collect([tmp_path]).iloc[0]
    expected = sum(p.numel() for p in create_model("ststnet", num_classes=3).parameters())
    # 16 3x3 filters on 3 channels + biases, 16 BN scales and shifts, Linear(400, 3)
    assert row["params"] == expected == 16 * 27 + 16 + 2 * 16 + 401 * 3
    assert row["s_per_fold"] == 3.5 and row["folds"] == 2 and bool(row["complete"])


def _fold_job(sweep, i: int, finished: bool = True) -> None:
    """Job ``i`` of a sweep of LOSO fold jobs (Hydra's ``<n>_<overrides>`` folder, with its
    ``.hydra/``); ``finished=False``: the job started (``.hydra/`` written) but never wrote
    results.json (killed, failed, still running)."""
    import pandas as pd

    run = sweep / f"{i}_protocol.fold_index={i}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- protocol.fold_index={i}\n")
    (run / ".hydra" / "config.yaml").write_text("name: x\nmodel: {name: ststnet}\n")
    if not finished:
        return
    results = {"name": "x", "synthetic": True, "data": {"class_names": ["a", "b"]},
               "config": {"model": {"name": "ststnet"}, "data": {"name": "synme"},
                          "protocol": {"fold_index": i}},
               "protocol": {"total_folds": 3}}
    (run / "results.json").write_text(json.dumps(results))
    pd.DataFrame({"subject": [f"s{i}"], "clip": ["c"], "database": ["db"], "fold": [f"db/s{i}"],
                  "label": [i % 2], "prediction": [i % 2]}).to_csv(run / "predictions.csv",
                                                                  index=False)


def test_a_job_folder_without_results_is_listed_not_dropped(tmp_path, capsys):
    """A sweep job that started (Hydra wrote its .hydra/) but never finished is a row marked
    unfinished, with its folder, and a warning on stderr; the finished jobs are still pooled
    (and reported incomplete: 2 of 3 folds)."""
    sweep = tmp_path / "sweep"
    _fold_job(sweep, 0)
    _fold_job(sweep, 1)
    _fold_job(sweep, 2, finished=False)
    table = main([str(sweep)])
    err = capsys.readouterr().err
    job = sweep / "2_protocol.fold_index=2"
    assert f"{job}" in err and "no results.json" in err
    assert sorted(table["status"]) == ["ok", "unfinished"]
    unfinished = table[table["status"] == "unfinished"].iloc[0]
    assert unfinished["run"] == str(job)
    assert unfinished["overrides"] == "" and unfinished["name"] == "x"
    pooled = table[table["status"] == "ok"].iloc[0]
    assert pooled["folds"] == 2 and not bool(pooled["complete"])
    md = (sweep / "summary.md").read_text()
    assert "unfinished" in md and str(job) in md


def test_only_unfinished_jobs_is_an_error_naming_them(tmp_path):
    sweep = tmp_path / "sweep"
    _fold_job(sweep, 0, finished=False)
    with pytest.raises(CollectError, match="no results.json") as err:
        collect([sweep])
    assert f"{sweep / '0_protocol.fold_index=0'} (unfinished)" in str(err.value)


def test_command_line_error_is_one_mer_line(tmp_path):
    """``python -m mer.collect`` runs the module as ``__main__``: its CollectError is still
    mer's own (``mer: ...``, exit 2, no traceback)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mer.collect", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"mer: no results.json under {tmp_path}")
    assert "Traceback" not in proc.stderr


def test_out_is_a_file(tmp_path):
    sweep = tmp_path / "sweep"
    _fold_job(sweep, 0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CollectError, match=f"--out {tmp_path / 'afile'} is a file"):
        main([str(sweep), "--out", str(tmp_path / "afile")])
    assert (tmp_path / "afile").read_text() == "x"


def test_unreadable_predictions_are_named(tmp_path):
    sweep = tmp_path / "sweep"
    _fold_job(sweep, 0)
    pred = sweep / "0_protocol.fold_index=0" / "predictions.csv"
    pred.write_bytes(b"\x00\xff\xfe garbage \"unterminated\n1,2,3,4,5,6,7\n")
    with pytest.raises(CollectError, match=f"{pred} cannot be read"):
        collect([sweep])


def test_results_of_another_shape_are_named(tmp_path):
    """A results.json with 'config' but not the keys this version reads (an older mer's, or
    edited by hand): named, never a KeyError."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"name": "x", "config": {"model": {}},
                                                  "federated": {"clients": []}}))
    with pytest.raises(CollectError, match=f"{run / 'results.json'} lacks"):
        collect([tmp_path])
