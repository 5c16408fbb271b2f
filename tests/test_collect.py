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
