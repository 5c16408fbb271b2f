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
