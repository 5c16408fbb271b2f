"""Long-video preprocessing: feature shapes, head motion removed, re-detection, the chunk cache
(resume, same arrays as one stream), bounded memory, bad input named, and SynME-LV learnable."""

import dataclasses
import shutil
import tracemalloc

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mer.data import sources
from mer.data.databases import DatabaseError
from mer.data.preprocess import longvideo as lvmod
from mer.data.preprocess.longvideo import (
    ROI_NAMES,
    FeatureStream,
    LongVideoError,
    LongVideoParams,
    check_intervals,
    collect,
    iter_chunks,
    load_long_video_features,
    prepare_long_videos,
    prepare_videos,
)
from mer.data.synthetic import SynDatabaseSpec, _draw_identity, _landmarks_units, _to_px
from mer.data.synthetic import render_face as synme_face
from mer.data.synthetic_lv import (
    SynLVDatabaseSpec,
    SynMELVConfig,
    load_lv_meta,
    video_landmarks,
)

CONF = "conf/data/synme_lv.yaml"
PRESET_CONFIG = sources.synme_lv_config  # the real one (some fixtures swap in the small set)
BUSY = {"expressions_per_minute": 24.0, "blinks_per_minute": 16.0,
        "head_turns_per_minute": 16.0, "talks_per_minute": 12.0,
        "light_changes_per_minute": 10.0}


def small_config() -> SynMELVConfig:
    return SynMELVConfig(0, [
        SynLVDatabaseSpec(name="casme_sq", layout="casme_sq", fps=30, height=72, width=64,
                          color=True, n_subjects=2, videos_per_subject=(1, 2),
                          seconds=(10.0, 12.0), **BUSY),
        SynLVDatabaseSpec(name="samm_lv", layout="samm_lv", fps=200, height=64, width=64,
                          color=False, n_subjects=2, videos_per_subject=(1, 1),
                          seconds=(8.0, 9.0), **BUSY),
    ])


def data_cfg(**over):
    cfg = OmegaConf.load(CONF)
    cfg.workers, cfg.preset = 0, "tiny"
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lvcache")


@pytest.fixture
def small(monkeypatch, cache):
    """data=synme_lv served from the small collection (generated once per module)."""
    monkeypatch.setattr(sources, "synme_lv_config", lambda cfg: small_config())
    return cache


@pytest.fixture(scope="module")
def features(cache):
    mp = pytest.MonkeyPatch()
    mp.setattr(sources, "synme_lv_config", lambda cfg: small_config())
    try:
        yield prepare_long_videos(data_cfg(), cache, progress=False)
    finally:
        mp.undo()


# ----------------------------------------------------------------------------- the interface


def test_features_of_every_video_with_their_shapes(features):
    lv = features
    assert sorted(lv.features) == sorted(lv.videos["video_id"]) and len(lv.features) >= 4
    assert lv.synthetic and set(lv.intervals["video_id"]) <= set(lv.features)
    for v in lv.videos.to_dict("records"):
        f = lv.features[v["video_id"]]
        t, k = v["n_frames"], round(0.2 * v["fps"])
        assert f.flow.shape == (t, len(ROI_NAMES), 2) and f.flow.dtype == np.float32
        assert f.crops.shape == (t, 32, 32) and f.crops.dtype == np.uint8
        assert f.magnitude.shape == (t,) and f.head.shape == (t, 2) and f.valid.shape == (t,)
        assert list(f.frame_numbers) == list(range(1, t + 1)) and f.roi_names == ROI_NAMES
        assert (f.fps, f.k) == (v["fps"], k) and f.problems == []
        assert f.valid[:-k].all() and not f.valid[-k:].any()  # no frame t + k at the end
        assert isinstance(f.flow, np.memmap) and f.crops[:-k].std() > 5
        assert np.isfinite(f.flow).all() and (f.magnitude[f.valid] > 0).all()


def test_intervals_and_videos_tables(features):
    lv = features
    assert {"video_id", "onset", "apex", "offset", "type", "emotion", "aus", "database"} <= \
        set(lv.intervals.columns)
    assert set(lv.intervals["database"]) == {"casme_sq", "samm_lv"}
    assert set(lv.videos["fps"]) == {30.0, 200.0} and lv.excluded == []
    for r in lv.intervals.itertuples():
        meta = load_lv_meta(lv.videos.set_index("video_id").loc[r.video_id, "synthetic_meta"])
        assert any(it["onset"] == r.onset and it["offset"] == r.offset
                   for it in meta["videos"][r.video]["intervals"])


def _face(h: int = 80, w: int = 72, seed: int = 1):
    spec = SynDatabaseSpec(name="x", fps=30, height=h, width=w, color=False, n_subjects=1,
                           clips_per_subject=(1, 1), emotion_weights={"others": 1.0})
    ident = _draw_identity(np.random.default_rng(seed), spec)
    lm = _to_px(ident, _landmarks_units(ident))
    return cv2.cvtColor(synme_face(ident, lm, h, w), cv2.COLOR_BGR2GRAY), lm


def _shifted(image, dx, dy, rng, sigma=1.0):
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(image, m, image.shape[::-1], flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
    return np.clip(np.rint(moved + rng.standard_normal(image.shape) * sigma), 0,
                   255).astype(np.uint8)


def test_pure_head_translation_gives_near_zero_roi_features():
    face, lm = _face()
    rng = np.random.default_rng(0)
    step = np.array([0.15, 0.05])  # px per frame: 0.9, 0.3 px over k = 6 frames at 30 fps
    frames = [(n, _shifted(face, *(step * n), rng)) for n in range(1, 61)]
    params = LongVideoParams(detector="synthetic")
    stream = FeatureStream(30, params, lambda n, g: lm + step * n, "translation")
    out = collect(stream.run(frames), 60, params)
    ok = out["valid"]
    assert ok.sum() == 54
    from mer.data.preprocess.align import alignment_matrix

    scale = np.sqrt(np.linalg.det(alignment_matrix(lm, params.size, params.margin)[:, :2]))
    head = step * 6 * scale  # in pixels of the face crop
    assert np.allclose(np.median(out["head"][ok], axis=0), head, atol=0.1)  # head motion
    residual = np.abs(out["flow"][ok])
    assert residual.max() < 0.15 * np.linalg.norm(head) and np.median(residual) < 0.04
    # without the removal the ROIs would carry the whole translation
    assert np.linalg.norm(out["flow"][ok] + out["head"][ok][:, None], axis=2).min() > \
        0.7 * np.linalg.norm(head)


def test_tracking_lost_makes_it_detect_again():
    face, lm = _face(96, 120)
    rng = np.random.default_rng(0)
    jump = np.array([30.0, 0.0])  # the face leaves the crop at frame 20: no point tracks
    where = {n: (jump if n >= 20 else np.zeros(2)) for n in range(1, 41)}
    frames = [(n, _shifted(face, *where[n], rng)) for n in range(1, 41)]
    params = LongVideoParams(detector="synthetic", redetect_seconds=100.0)
    stream = FeatureStream(30, params, lambda n, g: lm + where[n], "jump")
    out = collect(stream.run(frames), 40, params)
    assert stream.lost == [20] and stream.detections == [1, 20]
    still = out["valid"] & ((out["frame_numbers"] + 6 < 20) | (out["frame_numbers"] >= 20))
    assert np.abs(out["flow"][still]).max() < 0.15  # landmarks followed the face
    stream = FeatureStream(30, dataclasses.replace(params, redetect_seconds=0.5),
                           lambda n, g: lm + where[n], "jump")
    collect(stream.run(frames[:19]), 19, params)
    assert stream.detections == [1, 16] and stream.lost == []  # every 15 frames otherwise


# ----------------------------------------------------------------------------- the cache


def _video_table(lv, video_id):
    return lv.videos[lv.videos["video_id"] == video_id].reset_index(drop=True)


def test_chunks_resume_and_equal_one_stream(features, tmp_path, monkeypatch):
    lv = features
    video = _video_table(lv, "casme_sq/15_0507climbing")
    assert len(video) == 1
    params = LongVideoParams(detector="synthetic", chunk_frames=100)
    done = []
    real = lvmod._chunk_work

    def killed_after_one(task):
        if done:
            raise KeyboardInterrupt  # the prepare is killed while computing the second chunk
        done.append(task["chunk"])
        return real(task)

    monkeypatch.setattr(lvmod, "_chunk_work", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare_videos(video, params, tmp_path / "a", progress=False, synthetic=True)
    assert done == [0] and not list((tmp_path / "a").rglob(".*tmp*"))  # nothing half-written
    computed = []
    monkeypatch.setattr(lvmod, "_chunk_work", lambda task: computed.append(task["chunk"])
                        or real(task))
    resumed, _, stats = prepare_videos(video, params, tmp_path / "a", progress=False,
                                       synthetic=True)
    n_chunks = -(-int(video["n_frames"][0]) // 100)
    assert n_chunks >= 3
    assert computed == list(range(1, n_chunks)) and stats["chunks_computed"] == n_chunks - 1
    computed.clear()
    again, _, stats = prepare_videos(video, params, tmp_path / "a", progress=False)
    assert computed == [] and stats["chunks_computed"] == 0  # all cached now
    fresh, _, _ = prepare_videos(video, params, tmp_path / "b", progress=False, synthetic=True)
    meta = load_lv_meta(video["synthetic_meta"][0])
    plan = meta["videos"][video["video"][0]]["plan"]
    stream = FeatureStream(30, params, lambda n, g: video_landmarks(plan, n), "v")
    frames = lvmod.list_frames(video["frame_dir"][0])
    whole = collect(stream.run(zip(frames.numbers, frames.paths, strict=True)),
                    len(frames.numbers), params)
    a, b = (x[video["video_id"][0]] for x in (resumed, fresh))
    for name in ("flow", "head", "magnitude", "crops", "valid", "frame_numbers"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert np.array_equal(getattr(a, name), whole[name]), name  # = one stream, unchunked


def _stream_peak(n_frames: int) -> int:
    """Peak traced memory of streaming n small frames through FeatureStream, chunk by chunk."""
    face, lm = _face(64, 64)
    rng = np.random.default_rng(0)
    params = LongVideoParams(detector="synthetic", chunk_frames=100, size=64)

    def frames():
        for n in range(1, n_frames + 1):
            yield n, _shifted(face, 0.3 * np.sin(n / 20), 0.0, rng)

    stream = FeatureStream(30, params, lambda n, g: lm, "memory")
    tracemalloc.start()
    try:
        count = sum(len(c["flow"]) for c in iter_chunks(stream.run(frames()), params))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n_frames
    return peak


def test_memory_stays_flat_with_video_length():
    short, long = _stream_peak(200), _stream_peak(1000)
    assert long < 1.25 * short, (short, long)  # 5x the frames, not 5x the memory


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def samm_copy(features, tmp_path):
    """A copy of the small SAMM-LV database, to damage."""
    src = _video_table(features, "samm_lv/006_1")["synthetic_meta"][0]
    dst = tmp_path / "samm_lv"
    shutil.copytree(src, dst)
    return dst


def _samm_table(root):
    from mer.data.synthetic_lv import SAMM_MICRO_SHEET

    return sources.load_intervals(OmegaConf.create({
        "name": "samm_lv", "kind": "samm_lv", "root": str(root), "on_error": "raise",
        "options": {"micro_sheet": str(root / SAMM_MICRO_SHEET), "types": ["micro"]}}), root)


def test_gap_in_frame_numbering(features, tmp_path):
    video = _video_table(features, "casme_sq/15_0507climbing")
    folder = tmp_path / "15_0507climbing"
    shutil.copytree(video["frame_dir"][0], folder)
    for n in (57, 58, 59):
        (folder / f"img{n}.jpg").unlink()
    video["frame_dir"] = str(folder)
    params = LongVideoParams(detector="synthetic")
    with pytest.raises(LongVideoError, match=r"video casme_sq/15_0507climbing: frames 57\.\.59 "
                       r"missing in .*15_0507climbing \(the numbering jumps from 56 to 60\).*"
                       "data.on_error=skip"):
        prepare_videos(video, params, tmp_path / "c", progress=False)
    feats, problems, _ = prepare_videos(video, params, tmp_path / "c", on_error="skip",
                                        progress=False)
    assert problems == [{"video": "casme_sq/15_0507climbing", "frames": [57, 59],
                         "reason": "frames missing (gap in the numbering)"}]
    f = feats["casme_sq/15_0507climbing"]
    assert 57 not in f.frame_numbers and 56 in f.frame_numbers
    no_partner = np.isin(f.frame_numbers + f.k, [57, 58, 59])
    assert not f.valid[no_partner].any() and f.valid[f.frame_numbers == 16].all()


def _blind(monkeypatch):
    """Detectors that find no face on a flat picture (as a real one would)."""
    real = lvmod.make_detect

    def blind(spec):
        detect = real(spec)
        return lambda n, g: None if g.std() < 2 else detect(n, g)

    monkeypatch.setattr(lvmod, "make_detect", blind)


def test_no_face_stretch_named_or_listed(small, features, monkeypatch, tmp_path):
    for folder in ("synme_lv", "longvideo"):  # the small SynME-LV and its features, to damage
        shutil.copytree(small / folder, tmp_path / folder)
    cfg, skip = data_cfg(), data_cfg(on_error="skip")
    folder = _video_table(features, "samm_lv/006_1")["frame_dir"][0].replace(str(small),
                                                                             str(tmp_path))
    for n in range(300, 341):  # the face leaves the picture: tracking is lost, no detection
        cv2.imwrite(f"{folder}/006_1_{n:04d}.jpg", np.full((64, 64), 128, np.uint8))
    _blind(monkeypatch)
    with pytest.raises(LongVideoError, match=r"video samm_lv/006_1: no face found on frame 300 "
                       r"\(.*006_1_0300\.jpg\).*data.on_error=skip"):
        prepare_long_videos(cfg, tmp_path, progress=False)
    from mer.prepare import prepare

    report = prepare(OmegaConf.create({"data": skip, "paths": {"cache_dir": str(tmp_path)}}),
                     tmp_path / "run")
    stretch = {"video": "samm_lv/006_1", "frames": [300, 340], "reason": "no face found"}
    assert report["kind"] == "long_videos" and report["problems"] == [stretch]
    assert report["stats"]["chunks_computed"] == 1  # only the damaged video
    md = (tmp_path / "run" / "prepare_report.md").read_text()
    assert "samm_lv/006_1 frames 300..340: no face found" in md and "synthetic" in md
    f = load_long_video_features(skip, tmp_path)["samm_lv/006_1"]
    gone = (f.frame_numbers >= 300) & (f.frame_numbers <= 340)
    assert not f.valid[gone].any() and (f.crops[gone] == 0).all()
    assert f.valid[(f.frame_numbers < 300) | (f.frame_numbers > 340)][:-f.k].all()
    with pytest.raises(LongVideoError, match=r"no face found on frames 300\.\.340 \(found by an "
                       r"earlier prepare with data.on_error=skip\)"):
        load_long_video_features(cfg, tmp_path)


def test_no_face_stretch_across_chunks_is_one_stretch(features, monkeypatch, tmp_path):
    video = _video_table(features, "casme_sq/15_0507climbing")
    folder = tmp_path / "15_0507climbing"
    shutil.copytree(video["frame_dir"][0], folder)
    video["frame_dir"] = str(folder)
    for n in range(90, 111):
        cv2.imwrite(str(folder / f"img{n}.jpg"), np.full((72, 64, 3), 128, np.uint8))
    _blind(monkeypatch)
    params = LongVideoParams(detector="synthetic", chunk_frames=100)
    _, problems, stats = prepare_videos(video, params, tmp_path / "c", on_error="skip",
                                        progress=False)
    assert stats["chunks_computed"] >= 3
    assert problems == [{"video": "casme_sq/15_0507climbing", "frames": [90, 110],
                         "reason": "no face found"}]


def _edit_samm_sheet(root, row, **cells):
    path = root / "SAMM_LongVideos_V2_Release.xlsx"
    wb = openpyxl.load_workbook(path)
    columns = {"onset": 4, "apex": 5, "offset": 6}
    for name, value in cells.items():
        wb.active.cell(row=row, column=columns[name], value=value)
    wb.save(path)


def test_interval_past_the_end_or_reversed_named_by_row(samm_copy):
    _edit_samm_sheet(samm_copy, 12, offset=99999)
    with pytest.raises(DatabaseError, match=r"V2_Release.xlsx row 12 .*offset 99999 after the "
                       "last frame on disk"):
        _samm_table(samm_copy)
    _edit_samm_sheet(samm_copy, 12, onset=900, apex=900, offset=800)
    with pytest.raises(DatabaseError, match="row 12 .*offset 800 before onset 900"):
        _samm_table(samm_copy)


def test_overlapping_intervals_named_or_listed(samm_copy):
    ok = _samm_table(samm_copy).intervals
    first, second = ok[ok["video"] == "006_1"].iloc[:2].itertuples()
    _edit_samm_sheet(samm_copy, second.row, onset=first.offset - 5)
    with pytest.raises(LongVideoError, match=rf"video samm_lv/006_1: interval "
                       rf"{first.offset - 5}\.\.{second.offset} \(sheet row {second.row}\) "
                       rf"overlaps interval {first.onset}\.\.{first.offset} \(sheet row "
                       rf"{first.row}\)"):
        _samm_table(samm_copy)
    cfg = OmegaConf.create({"name": "samm_lv", "kind": "samm_lv", "root": str(samm_copy),
                            "on_error": "skip"})
    lv = sources.load_intervals(cfg, samm_copy)
    assert len(lv.intervals) == len(ok) - 1 and second.row not in set(lv.intervals["row"])
    assert "overlaps interval" in lv.excluded[0]["reason"]


def test_interval_over_missing_frames():
    intervals = pd.DataFrame([{"database": "d", "subject": "s", "video": "v", "video_id": "d/v",
                               "onset": 10, "apex": 12, "offset": 20, "row": 3}])
    videos = pd.DataFrame([{"video_id": "d/v", "frame_dir": "x", "gaps": [(15, 16)]}])
    with pytest.raises(LongVideoError, match=r"d/v: interval 10\.\.20 \(sheet row 3\) covers "
                       r"missing frames 15\.\.16"):
        check_intervals(intervals, videos)
    kept, excluded = check_intervals(intervals, videos, "skip")
    assert kept.empty and "missing frames 15..16" in excluded[0]["reason"]


def test_video_without_intervals_is_listed_and_truncated_frame_named(samm_copy, tmp_path):
    extra = samm_copy / "SAMM_longvideos/010_1"
    extra.mkdir()
    for n in range(1, 61):
        shutil.copy(samm_copy / f"SAMM_longvideos/006_1/006_1_{n:04d}.jpg",
                    extra / f"010_1_{n:04d}.jpg")
    lv = _samm_table(samm_copy)
    row = lv.videos[lv.videos["video_id"] == "samm_lv/010_1"].iloc[0]
    assert (row["subject"], row["n_frames"]) == ("010", 60)  # FPs are counted there too
    padded = extra / "010_1_0029.jpg"  # bytes after the end marker: a valid JPEG all the same
    padded.write_bytes(padded.read_bytes() + b"\0" * 2048)
    assert lvmod.read_grey(str(padded), "v").shape == (64, 64)
    bad = extra / "010_1_0030.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    stream = FeatureStream(200, LongVideoParams(detector="synthetic"), lambda n, g: None,
                           "samm_lv/010_1", on_error="skip")
    with pytest.raises(LongVideoError, match=r"samm_lv/010_1: frame file .*010_1_0030.jpg is a "
                       "truncated JPEG"):
        list(stream.run((n, str(extra / f"010_1_{n:04d}.jpg")) for n in range(25, 35)))


def test_video_folder_without_frames(samm_copy):
    (samm_copy / "SAMM_longvideos/011_1").mkdir()
    with pytest.raises(LongVideoError, match=r"no frame images in the video folder .*011_1; "
                       r"re-extract .*data.on_error=skip"):
        _samm_table(samm_copy)
    cfg = OmegaConf.create({"name": "samm_lv", "kind": "samm_lv", "root": str(samm_copy),
                            "on_error": "skip"})
    lv = sources.load_intervals(cfg, samm_copy)
    assert "samm_lv/011_1" not in set(lv.videos["video_id"]) and len(lv.videos) == 2
    assert lv.excluded[0]["clip"] == "011_1" and "video left out" in lv.excluded[0]["reason"]


def test_frames_of_another_size_or_type_and_bad_params():
    face, lm = _face()
    stream = FeatureStream(30, LongVideoParams(detector="synthetic"), lambda n, g: lm, "v")
    with pytest.raises(LongVideoError, match=r"video v: frame 2 is a float32 image of shape "
                       r"\(80, 72\); frames must be 8-bit"):
        list(stream.run([(1, face.astype(np.uint8)), (2, face)]))
    face = face.astype(np.uint8)
    frames = [(1, face), (2, face), (3, cv2.resize(face, (40, 40)))]
    stream = FeatureStream(30, LongVideoParams(detector="synthetic"), lambda n, g: lm, "v")
    with pytest.raises(LongVideoError, match="video v: frame 3 .*is 40x40, the video's first "
                       "frame 72x80"):
        list(stream.run(frames))
    with pytest.raises(ValueError, match="detector='none'"):
        LongVideoParams(detector="none")
    with pytest.raises(ValueError, match=r"data.longvideo: unknown keys \['sizes'\]"):
        LongVideoParams.from_data_cfg(data_cfg(**{"longvideo.sizes": 3}))


# ----------------------------------------------------------------------------- learnable


def _auc(pos, neg):
    values = np.concatenate([pos, neg])
    ranks = values.argsort().argsort() + 1
    return (ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def test_expressions_stand_out_in_roi_flow_but_raw_motion_is_fooled(features):
    """Per event, the peak of a frame score over the event: expressions against quiet
    stretches and head turns (those clear of any expression), in the ROI flow (head motion
    removed) and in raw face motion (head + face)."""
    lv = features
    peaks: dict[str, dict[str, list]] = {"roi": {}, "raw": {}}
    rng = np.random.default_rng(0)
    for v in lv.videos.to_dict("records"):
        f = lv.features[v["video_id"]]
        m = load_lv_meta(v["synthetic_meta"])["videos"][v["video"]]
        n, k, valid = np.asarray(f.frame_numbers), f.k, np.asarray(f.valid)
        scores = {"roi": np.linalg.norm(np.asarray(f.flow), axis=2).max(1) * valid,
                  "raw": (np.linalg.norm(np.asarray(f.head), axis=1) + f.magnitude) * valid}
        events = [("expression", it["onset"], it["apex"]) for it in m["intervals"]]
        events += [(kind, a, b) for kind in m["events"] for a, b in m["events"][kind]]
        busy = np.zeros(len(n), bool)
        for kind, a, b in events:
            busy |= (n + 2 * k >= a) & (n <= b + k)
            if kind != "expression" and any(a <= it["offset"] + k and it["onset"] - k <= b
                                            for it in m["intervals"]):
                continue  # a distractor during an expression: its peak is the expression's
            for name, score in scores.items():
                peaks[name].setdefault(kind, []).append(score[(n + k >= a) & (n <= b)].max())
        for start in rng.choice(np.flatnonzero(~busy[:-2 * k]), 10):
            for name, score in scores.items():
                peaks[name].setdefault("quiet", []).append(score[start:start + k].max())
    roi, raw = peaks["roi"], peaks["raw"]
    assert len(roi["expression"]) >= 12 and len(roi["head_turns"]) >= 3
    assert _auc(roi["expression"], roi["quiet"]) > 0.9  # visible above the noise floor
    head = _auc(roi["expression"], roi["head_turns"])
    raw_head = _auc(raw["expression"], raw["head_turns"])
    assert head > 0.75 and raw_head < 0.45 and head - raw_head > 0.35  # head motion removed
    both = np.concatenate([roi["blinks"], roi["talks"]])
    assert 0.2 < _auc(roi["expression"], both) < 0.9  # not trivial: blinks, talking compete


def _cpu_seconds() -> float:
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.mark.slow
def test_tiny_preset_generates_and_prepares(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "synme_lv_config", PRESET_CONFIG)
    cpu = _cpu_seconds()
    lv = sources.load_intervals(data_cfg(workers=2), tmp_path)
    assert _cpu_seconds() - cpu < 60  # CPU seconds (2 cores: well under a minute of wall time)
    assert len(lv.videos) == 8 and lv.synthetic and set(lv.intervals["type"]) == {"micro",
                                                                                    "macro"}
    prepared = prepare_long_videos(data_cfg(workers=2), tmp_path, progress=False)
    assert len(prepared.features) == 8 and prepared.problems == []
