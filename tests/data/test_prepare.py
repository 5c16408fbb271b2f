"""The full pipeline on SynME (whose landmarks and displacements are known) and mer.prepare."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.data.databases.casme2 import read_casme2
from mer.data.preprocess.cache import FlowCache
from mer.data.preprocess.pipeline import PreprocessError
from mer.data.preprocess.prepared import (
    PrepareParams,
    entry_key,
    prepare_clip,
    prepare_table,
    use_prepared,
)
from mer.data.synthetic import apex_displacement, ensure_synme, load_meta, tiny_synme_config
from mer.run import CONFIG_DIR

pytest.importorskip("mediapipe", reason="face detection needs mediapipe (README, Face detection)")
PARAMS = PrepareParams()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mer-cache-prepare")


@pytest.fixture(scope="module")
def synme(cache_dir):
    """(root, sample table) of the tiny SynME, generated where load_samples looks for it."""
    syn = tiny_synme_config(0)
    root = ensure_synme(syn, cache_dir / "synme")
    tables = []
    for spec in syn.databases:
        t, _ = read_casme2(root / spec.name, database=spec.name)
        t["fps"] = float(spec.fps)
        tables.append(t)
    return root, pd.concat(tables, ignore_index=True)


@pytest.fixture(scope="module")
def prepared(synme, cache_dir):
    _, table = synme
    cache = FlowCache(cache_dir / "prepared" / "clips")
    return prepare_table(table, PARAMS, cache, workers=0, progress=False), cache


def _entry(cache: FlowCache, row: dict) -> dict:
    entry = cache.get_arrays(entry_key(row, PARAMS, {}))
    assert entry is not None
    return entry


def test_landmarks_are_found_on_synme_frames(synme):
    from mer.data.preprocess.face import MediaPipeDetector

    root, table = synme
    detector = MediaPipeDetector()
    found, errors = 0, []
    paths = list(table["onset_path"]) + list(table["apex_path"])
    subjects = list(table["subject"]) * 2
    databases = list(table["database"]) * 2
    for path, sub, db in zip(paths, subjects, databases):
        face = detector(cv2.imread(path, cv2.IMREAD_UNCHANGED))
        if face is None:
            continue
        found += 1
        truth = np.array(load_meta(root / db)["subjects"][sub]["landmarks"])
        iod = np.linalg.norm(truth[42:48].mean(0) - truth[36:42].mean(0))
        errors.append(np.linalg.norm(face.landmarks - truth, axis=1).mean() / iod)
    assert found >= 0.95 * len(paths)
    assert np.mean(errors) < 0.1  # mean error under a tenth of the inter-ocular distance


def test_apex_flow_agrees_with_the_generated_displacement(synme, prepared):
    root, table = synme
    _, cache = prepared
    cosines, epes = [], []
    for row in table.to_dict("records"):
        entry = _entry(cache, row)
        m = entry["matrix"]
        truth = apex_displacement(root / row["database"], row["subject"], row["clip"])
        # the known field carried into the crop: sample it there, turn and scale the vectors
        d = cv2.warpAffine(truth, m, (PARAMS.size, PARAMS.size)) @ m[:, :2].T
        mag = np.linalg.norm(d, axis=2)
        moving = mag >= 0.5 * mag.max()
        flow = entry["flow_px"].astype(np.float32).transpose(1, 2, 0)[moving]
        d = d[moving]
        cos = (flow * d).sum(1) / (np.linalg.norm(flow, axis=1) * np.linalg.norm(d, axis=1) + 1e-9)
        cosines.append(cos.mean())
        epes.append(np.linalg.norm(flow - d, axis=1).mean() / np.linalg.norm(d, axis=1).mean())
    assert np.mean(cosines) > 0.8
    assert np.median(epes) < 0.6  # endpoint error relative to the true displacement


def test_outputs_have_their_shapes_and_landmarks_sit_in_the_crop(prepared, synme):
    res, _ = prepared
    n = len(synme[1])
    assert res.x.shape == (n, 3, 28, 28) and res.x_hi.shape == (n, 3, 128, 128)
    assert res.x.min() >= 0 and res.x.max() <= 1 and res.computed == n and not res.failures
    assert ((res.landmarks >= 0) & (res.landmarks <= 127)).all()
    lm28 = res.landmarks_at(28)
    assert ((lm28 > -0.5) & (lm28 < 27.5)).all()
    left, right = res.landmarks[:, 36:42].mean(1), res.landmarks[:, 42:48].mean(1)
    assert np.abs(left[:, 1] - right[:, 1]).max() < 0.5  # eyes level in the aligned crop


def test_cached_rerun_computes_nothing_and_gives_the_same(prepared, synme):
    res, cache = prepared
    again = prepare_table(synme[1], PARAMS, FlowCache(cache.root), workers=0, progress=False)
    assert again.hits == len(synme[1]) and again.computed == 0
    assert np.array_equal(again.x, res.x) and np.array_equal(again.landmarks, res.landmarks)


def test_interrupted_prepare_resumes_where_it_stopped(prepared, synme):
    res, cache = prepared
    rows = synme[1].to_dict("records")
    for row in rows[:3]:  # as if the run had stopped before these, leaving a temporary file
        path = cache.arrays_path(entry_key(row, PARAMS, {}))
        path.unlink()
        path.with_name(f".{path.stem}.abc.tmp").write_bytes(b"half")
    again = prepare_table(synme[1], PARAMS, FlowCache(cache.root), workers=0, progress=False)
    assert again.computed == 3 and again.hits == len(rows) - 3
    assert np.allclose(again.x, res.x, atol=1e-6)


def test_workers_give_the_same_result(prepared, synme):
    res, _ = prepared
    par = prepare_table(synme[1].iloc[:3], PARAMS, None, workers=2, progress=False)
    assert np.allclose(par.x, res.x[:3], atol=1e-6)


def test_apex_is_estimated_where_the_sheet_has_none(synme):
    root, table = synme
    errors, rises = [], []
    for row in table.to_dict("records"):
        info = load_meta(root / row["database"])["subjects"][row["subject"]]["clips"][row["clip"]]
        if info["blink"] is not None or len(errors) == 4:
            continue
        entry = prepare_clip({**row, "apex": -1, "apex_path": ""}, PARAMS)
        errors.append(abs(int(entry["apex"]) - row["apex"]))
        rises.append(row["apex"] - row["onset"])
    # the profile is flat near the apex: a few frames off is a few percent of its motion
    assert np.median(errors) <= max(2, np.median(rises) / 4)


def _bad_table(table, tmp_path) -> pd.DataFrame:
    """A good row, then one per fault: missing apex, unreadable onset, no face."""
    good = table.iloc[0].to_dict()
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "img1.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(folder / "img2.jpg"), np.full((96, 88, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "img3.jpg"), np.full((96, 88, 3), 130, np.uint8))
    shutil.copy(good["onset_path"], folder / "img10.jpg")
    rows = [good,
            {**good, "clip": "missing", "row": 91, "onset_path": str(folder / "img10.jpg"),
             "onset": 10, "apex": 11, "apex_path": str(folder / "img11.jpg")},
            {**good, "clip": "corrupt", "row": 92, "onset_path": str(folder / "img1.jpg"),
             "onset": 1, "apex": 2, "apex_path": str(folder / "img2.jpg")},
            {**good, "clip": "noface", "row": 93, "onset_path": str(folder / "img2.jpg"),
             "onset": 2, "apex": 3, "apex_path": str(folder / "img3.jpg")}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("clip, message", [
    ("missing", r"missing \(sheet row 91\): cannot read frame file .*img11\.jpg"),
    ("corrupt", r"corrupt \(sheet row 92\): cannot decode frame file .*img1\.jpg"),
    ("noface", r"noface \(sheet row 93\): no face found on the onset frame .*img2\.jpg"),
])
def test_bad_input_raises_naming_file_and_row(synme, tmp_path, clip, message):
    bad = _bad_table(synme[1], tmp_path)
    one = bad[bad["clip"] == clip]
    with pytest.raises(PreprocessError, match=message):
        prepare_table(one, PARAMS, FlowCache(tmp_path / "c"), progress=False)


def test_bad_input_is_skipped_and_listed(synme, tmp_path):
    bad = _bad_table(synme[1], tmp_path)
    res = prepare_table(bad, PARAMS, FlowCache(tmp_path / "c"), on_error="skip", progress=False)
    assert res.kept.tolist() == [0]
    reasons = {f["clip"]: f["reason"] for f in res.failures}
    assert set(reasons) == {"missing", "corrupt", "noface"}
    assert "img11.jpg" in reasons["missing"] and "no face" in reasons["noface"]


def test_prepare_command_then_run_trains_on_the_cache(prepared, cache_dir, tmp_path):
    from mer.data.sources import load_samples
    from mer.prepare import prepare

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", f"paths.cache_dir={cache_dir}",
                                           "data.workers=0"])
    assert not use_prepared(cfg.data, cache_dir)
    report = prepare(cfg, tmp_path)  # clip entries were made by the fixture: all hits
    assert report["cache"]["computed"] == 0 and report["synthetic"] is True
    saved = json.loads((tmp_path / "prepare_report.json").read_text())
    assert saved["samples"] == sum(saved["counts_total"].values()) == report["samples"]
    assert all(e["reason"] for e in saved["excluded"])
    assert set(saved["seconds"]["stages_summed_over_clips"]) >= {"face", "flow", "apex"}
    assert "| all |" in (tmp_path / "prepare_report.md").read_text()

    assert use_prepared(cfg.data, cache_dir)  # mer.run now serves the prepared cache
    samples = load_samples(cfg.data, cache_dir)
    assert samples.provenance["prepare"]["computed"] == 0
    assert samples.x.shape == (report["samples"], 3, 28, 28)
    assert samples.landmarks.shape == (report["samples"], 68, 2)
