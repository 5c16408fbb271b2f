"""SynME-LV: written in the real CAS(ME)^2 and SAMM-LV layouts, read back by their readers with
exactly the intervals of its meta.json; micro / macro durations; distractors; determinism."""

import dataclasses
import json
import shutil

import cv2
import numpy as np
import openpyxl
import pytest

from mer.data.databases import read_database, read_intervals
from mer.data.synthetic_lv import (
    CASME_SQ_SHEET,
    ROOT_META_NAME,
    SAMM_LV_SHEET,
    SAMM_MICRO_SHEET,
    SynLVDatabaseSpec,
    SynMELVConfig,
    VideoRenderer,
    ensure_synme_lv,
    head_pose,
    load_lv_meta,
    plan_video,
    render_video,
    video_landmarks,
)

BUSY = {"expressions_per_minute": 24.0, "blinks_per_minute": 20.0,
        "head_turns_per_minute": 10.0, "talks_per_minute": 12.0,
        "light_changes_per_minute": 10.0}


def small_config(seed: int = 0) -> SynMELVConfig:
    """Two databases of 2 subjects and a few seconds each: a second or two to write."""
    return SynMELVConfig(seed, [
        SynLVDatabaseSpec(name="casme_sq", layout="casme_sq", fps=30, height=72, width=64,
                          color=True, n_subjects=2, videos_per_subject=(1, 2),
                          seconds=(8.0, 10.0), **BUSY),
        SynLVDatabaseSpec(name="samm_lv", layout="samm_lv", fps=200, height=64, width=64,
                          color=False, n_subjects=2, videos_per_subject=(1, 1),
                          seconds=(8.0, 9.0), **BUSY),
    ])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_synme_lv(small_config(), tmp_path_factory.mktemp("synme_lv"))


def _read(root, name):
    options = {"micro_sheet": root / name / SAMM_MICRO_SHEET} if name == "samm_lv" else {}
    return read_intervals(name, root / name, database=name, **options)


@pytest.mark.parametrize("name", ["casme_sq", "samm_lv"])
def test_readers_load_it_and_their_intervals_equal_the_meta(root, name):
    intervals, excluded = _read(root, name)
    assert excluded == []
    meta = load_lv_meta(root / name)
    assert meta["synthetic"] is True and meta["layout"] == name
    truth = [(v, m["subject"], it["onset"], it["apex"], it["offset"], it["type"], it["au"],
              it["row"]) for v, m in meta["videos"].items() for it in m["intervals"]]
    read = [(r.video, r.subject, r.onset, r.apex, r.offset, r.type, r.au_raw, r.row)
            for r in intervals.itertuples()]
    assert sorted(read) == sorted(truth) and len(read) >= 4
    assert set(intervals["fps"]) == {float(meta["fps"])}
    if name == "casme_sq":  # the code sheet has the emotions; SAMM-LV's has none
        emotions = {(v, it["onset"]): it["emotion"] for v, m in meta["videos"].items()
                    for it in m["intervals"]}
        assert [emotions[(r.video, r.onset)] for r in intervals.itertuples()] == \
            list(intervals["emotion"])
        assert set(intervals["emotion"]) <= {"negative", "positive", "surprise", "others"}


def test_real_layouts_and_sheets(root):
    casme, samm = root / "casme_sq", root / "samm_lv"
    assert (casme / CASME_SQ_SHEET).exists() and (samm / SAMM_LV_SHEET).exists()
    frame = next((casme / "rawpic").glob("s15/15_0*/img1.jpg"))
    assert cv2.imread(str(frame)).shape == (72, 64, 3)
    assert cv2.imread(str(samm / "SAMM_longvideos/006_1/006_1_0001.jpg"),
                      cv2.IMREAD_UNCHANGED).shape == (64, 64)  # grey, as SAMM
    wb = openpyxl.load_workbook(casme / CASME_SQ_SHEET)
    assert wb.sheetnames == ["Sheet1", "naming rule1", "naming rule2"]
    title, first = list(wb["Sheet1"].iter_rows(max_row=2, values_only=True))
    assert "synthetic" in title[0]  # a title line, which the reader leaves out
    assert first[0] == 1 and first[1].rsplit("_", 1)[1] == "1"  # header-less: participant 1
    assert first[7] in ("micro-expression", "macro-expression")
    rows = list(openpyxl.load_workbook(samm / SAMM_LV_SHEET).active.iter_rows(values_only=True))
    assert rows[10][:2] == ("Subject", "Filename")  # 10 text rows above the header


def test_samm_micro_sheet_gives_the_micro_expressions_their_emotion(root):
    meta = load_lv_meta(root / "samm_lv")
    truth = {it["expression"]: it["emotion"] for m in meta["videos"].values()
             for it in m["intervals"] if it["type"] == "micro"}
    table, excluded = read_database("samm_lv", root / "samm_lv",
                                    micro_sheet=root / "samm_lv" / SAMM_MICRO_SHEET)
    assert excluded == [] and len(table) == len(truth) > 0
    assert dict(zip(table["clip"], table["emotion"], strict=True)) == truth


def test_its_micro_expressions_load_as_clips_for_recognition(root, monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from mer.data import sources

    shutil.copytree(root, tmp_path / "synme_lv" / root.name)  # served from the cache
    monkeypatch.setattr(sources, "synme_lv_config", lambda cfg: small_config())
    cfg = OmegaConf.load("conf/data/synme_lv.yaml")
    cfg.workers, cfg.flow.method = 0, "farneback"
    samples = sources.load_samples(cfg, tmp_path)
    micro = [it for name in ("casme_sq", "samm_lv")
             for m in load_lv_meta(root / name)["videos"].values() for it in m["intervals"]
             if it["type"] == "micro"]
    assert samples.synthetic and samples.class_names == ["negative", "positive", "surprise"]
    assert len(samples.meta) + len(samples.excluded) == len(micro) > 0
    assert all("excludes 'other" in e["reason"] for e in samples.excluded)
    assert samples.x.shape == (len(samples.meta), 3, 28, 28)


@pytest.mark.parametrize("name", ["casme_sq", "samm_lv"])
def test_micro_and_macro_durations_and_no_overlap(root, name):
    meta = load_lv_meta(root / name)
    fps = meta["fps"]
    kinds = set()
    for m in meta["videos"].values():
        last = 0
        for it in m["intervals"]:
            seconds = (it["offset"] - it["onset"]) / fps
            assert (seconds <= 0.5) if it["type"] == "micro" else (0.5 < seconds <= 4.0)
            assert last < it["onset"] <= it["apex"] <= it["offset"] <= m["n_frames"]
            last = it["offset"]
            kinds.add(it["type"])
    assert kinds == {"micro", "macro"}


def test_every_distractor_kind_is_planned(root):
    counts = {k: 0 for k in ("blinks", "head_turns", "talks", "lights")}
    for name in ("casme_sq", "samm_lv"):
        for m in load_lv_meta(root / name)["videos"].values():
            for k in counts:
                counts[k] += len(m["events"][k])
    assert min(counts.values()) >= 1, counts


def test_generated_once_and_labelled_synthetic(root, tmp_path):
    info = json.loads((root / ROOT_META_NAME).read_text())
    assert info["synthetic"] is True and info["databases"] == {"casme_sq": "casme_sq",
                                                               "samm_lv": "samm_lv"}
    stamp = (root / ROOT_META_NAME).stat().st_mtime_ns
    assert ensure_synme_lv(small_config(), root.parent) == root  # cached: not written again
    assert (root / ROOT_META_NAME).stat().st_mtime_ns == stamp
    assert small_config(1).fingerprint() != small_config(0).fingerprint()
    assert not list(root.parent.glob(".synme_lv-*.tmp-*"))  # nothing half-written left


def test_frames_are_the_same_in_any_order_and_on_disk(root):
    meta = load_lv_meta(root / "casme_sq")
    video, m = next(iter(meta["videos"].items()))
    plan = m["plan"]
    streamed = dict(render_video(plan, 1, 12))
    renderer = VideoRenderer(plan)
    for n in (12, 3, 7):
        assert np.array_equal(renderer.frame(n), streamed[n])
    on_disk = cv2.imread(str(root / "casme_sq" / m["frame_dir"] / "img7.jpg"))
    assert np.abs(on_disk.astype(int) - streamed[7].astype(int)).mean() < 3  # JPEG q95


def test_head_turn_moves_the_face_and_its_landmarks():
    spec = dataclasses.replace(small_config().databases[0], seconds=(10.0, 10.0),
                               expressions_per_minute=0.01, blinks_per_minute=0,
                               talks_per_minute=0, light_changes_per_minute=0, drift_px=0,
                               head_turns_per_minute=20, noise_sigma=0)
    plan = plan_video(SynMELVConfig(3, [spec]), 0, 0, 0)
    turns = [t for t in plan["distractors"]["head_turns"] if not any(t["glance"])]
    turn = max(turns, key=lambda t: abs(t["tx"]) + abs(t["ty"]))  # a turn, not a glance
    before, after = turn["start"] + 1, turn["start"] + turn["length"] + 1
    moved = np.subtract(head_pose(plan, after - 1)[:2], head_pose(plan, before - 1)[:2])
    assert np.abs(moved).max() > 0.5
    lm_shift = (video_landmarks(plan, after) - video_landmarks(plan, before))[27:36].mean(0)
    renderer = VideoRenderer(plan)
    a, b = (np.float32(renderer.frame(n)).mean(-1) for n in (before, after))
    (dx, dy), _ = cv2.phaseCorrelate(a, b)
    assert np.allclose([dx, dy], moved, atol=0.35)  # the image moved by the pose's shift
    assert np.allclose(lm_shift, moved, atol=0.35)  # and so did the landmarks


def test_bad_configs_are_named():
    good = small_config().databases[0]
    with pytest.raises(ValueError, match="layout 'casme3'"):
        dataclasses.replace(good, layout="casme3")
    with pytest.raises(ValueError, match="at most 9 videos per subject"):
        dataclasses.replace(good, videos_per_subject=(1, 10))
    with pytest.raises(ValueError, match=r"'casme_sq'.*\['talk_px'\] must be >= 0"):
        dataclasses.replace(good, talk_px=-1)
    with pytest.raises(ValueError, match="unknown keys \\['fpss'\\]"):
        SynMELVConfig.from_dict({"seed": 0, "databases": [{**dataclasses.asdict(good),
                                                           "fpss": 3}]})
    with pytest.raises(ValueError, match="databases \\['smic'\\] are not in this preset"):
        SynMELVConfig.preset("tiny").select(["smic"])
    with pytest.raises(ValueError, match="preset 'huge'"):
        SynMELVConfig.preset("huge")
