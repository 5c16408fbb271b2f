"""scripts/reliability_cases.py: its --help, one fast case end to end, and its classifier."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability_cases.py"


@pytest.fixture(scope="module")
def rel():
    spec = importlib.util.spec_from_file_location("reliability_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability_cases"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--only", "--timeout", "--out"):
        assert option in out.stdout


def test_one_case_end_to_end(tmp_path):
    """A header-only flow-cache CSV: the reader names the CSV; the report says clear error."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "fc_header_only_csv",
                          "--out", str(tmp_path / "rel"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=120)
    report = json.loads((tmp_path / "rel" / "reliability.json").read_text())
    assert [c["name"] for c in report["cases"]] == ["fc_header_only_csv"]
    assert report["cases"][0]["outcome"] == "clear error", out.stdout + out.stderr
    assert report["counts"]["clear error"] == 1 and report["tried"] == 1
    assert out.returncode == 0
    md = (tmp_path / "rel" / "reliability.md").read_text()
    assert "| tried | OK | clear error | silent | traceback |" in md
    assert (tmp_path / "rel" / "logs" / "fc_header_only_csv.log").exists()


def _classify(rel, tmp_path, expect="error", names=("data.batch_size",), rc=2, err="",
              timed_out=False, silent=(), corrupt=(), hang=()):
    ctx = rel.Ctx(tmp_path, tmp_path / "cache", None, tmp_path)
    case = rel.Case("c", "g", expect, lambda c: None, names)
    c = rel.CaseRun(ctx, case)
    c.silent, c.corrupt, c.hang = list(silent), list(corrupt), list(hang)
    proc = rel.Proc(["x"], rc=rc, err=err, timed_out=timed_out)
    return rel.classify(case, c, proc)[0]


def test_classifier(rel, tmp_path):
    named = "mer: data.batch_size=0: must be an integer >= 1"
    tb = "Traceback (most recent call last):\n  File x\nValueError: data.batch_size=0"
    assert _classify(rel, tmp_path, err=named) == "clear error"
    assert _classify(rel, tmp_path, err="mer: something is wrong") == "unclear error"
    assert _classify(rel, tmp_path, rc=1, err=tb) == "traceback"  # named, but a traceback
    assert _classify(rel, tmp_path, rc=0) == "silent"  # an error was expected
    assert _classify(rel, tmp_path, expect="ok", rc=0) == "OK"
    assert _classify(rel, tmp_path, expect="ok", rc=0, silent=["UF1 differs"]) == "silent"
    assert _classify(rel, tmp_path, expect="ok", rc=2, err=named) == "unexpected error"
    assert _classify(rel, tmp_path, expect="either", rc=0) == "OK"
    assert _classify(rel, tmp_path, expect="either", err=named) == "clear error"
    assert _classify(rel, tmp_path, rc=-9, timed_out=True) == "hang"
    assert _classify(rel, tmp_path, err=named, hang=["1 process left"]) == "hang"
    assert _classify(rel, tmp_path, err=named, corrupt=["x.tmp left"]) == "corrupted"


def test_orphans_are_found_and_killed(rel, tmp_path):
    """A child left running in the run's process group is counted (and killed)."""
    code = ("import subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])")
    run = rel.Running([sys.executable, "-c", code], tmp_path, None)
    proc = run.wait(30)
    assert proc.rc == 0 and proc.orphans == 1
    assert rel._reap_group(run.popen.pid, grace=5) == 0  # the kill took


def test_recompute_metrics_catches_a_wrong_figure(rel, tmp_path):
    rows = [("s1", "a", "d", "f1", 0, 0, 0.9, 0.1), ("s1", "b", "d", "f1", 1, 0, 0.6, 0.4),
            ("s2", "c", "d", "f2", 1, 1, 0.2, 0.8), ("s2", "e", "d", "f2", 0, 1, 0.3, 0.7)]
    lines = ["subject,clip,database,fold,label,prediction,p_neg,p_pos"]
    lines += [",".join(map(str, r)) for r in rows]
    (tmp_path / "predictions.csv").write_text("\n".join(lines) + "\n")
    m = {"n": 4, "uf1": 0.5, "uar": 0.5, "accuracy": 0.5}
    results = {"data": {"class_names": ["neg", "pos"]},
               "metrics": {"overall": m, "per_database": {"d": m}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert rel.recompute_metrics(tmp_path) == []
    results["metrics"]["overall"] = {**m, "uf1": 0.6}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert rel.recompute_metrics(tmp_path) == [
        "overall uf1: results.json 0.6 != 0.5 from predictions.csv"]


def test_existing_keys_case_end_to_end(tmp_path):
    """mer.privacy.keys into a folder that already holds a key pair: refused, naming the file
    and --force, the secret file untouched: clear error."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "keys_existing_keys",
                          "--out", str(tmp_path / "rel"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=120)
    report = json.loads((tmp_path / "rel" / "reliability.json").read_text())
    assert report["cases"][0]["outcome"] == "clear error", out.stdout + out.stderr
