"""SynME: determinism, caching, the CASME II layout, the motion it encodes and its labels."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data import synthetic as syn
from mer.data.aus import parse_au_string

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CASME2_FIXTURE = SHARED / "fixtures" / "annotations" / "CASME2-coding.xlsx"


def _clean_config(seed: int = 0) -> syn.SynMEConfig:
    """One small database without nuisances (no noise, drift, head motion or blinks)."""
    spec = syn.SynDatabaseSpec(
        name="clean", fps=100, height=96, width=88, color=True, n_subjects=2,
        clips_per_subject=(3, 3), emotion_weights={"happiness": 1, "surprise": 1, "anger": 1},
        noise_sigma=0.0, illumination_drift=0.0, head_motion_px=0.0, blink_prob=0.0,
    )
    return syn.SynMEConfig(seed=seed, databases=[spec])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Root of the tiny SynME, generated once for this module (sequentially)."""
    return syn.ensure_synme(syn.tiny_synme_config(0), tmp_path_factory.mktemp("cache"))


def _frames(db_dir: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(db_dir)): cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for p in sorted((db_dir / syn.FRAME_ROOT).rglob("*.jpg"))
    }


def _clips(root: Path):
    """(db_dir, spec dict, subject, clip name, clip meta) for every clip under a SynME root."""
    for name in json.loads((root / syn.ROOT_META_NAME).read_text())["databases"]:
        meta = syn.load_meta(root / name)
        for subject, sub in meta["subjects"].items():
            for clip, info in sub["clips"].items():
                yield root / name, meta["spec"], subject, clip, info


def _read(db_dir: Path, subject: str, clip: str, number: int) -> np.ndarray:
    path = db_dir / syn.FRAME_ROOT / subject / clip / f"img{number}.jpg"
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.float32)


def test_same_seed_is_identical_whatever_the_worker_count(tiny, tmp_path):
    other = syn.generate_synme(syn.tiny_synme_config(0), tmp_path / "w2", workers=2)
    for spec in syn.tiny_synme_config(0).databases:
        a, b = tiny / spec.name, other / spec.name
        assert (a / syn.SHEET_NAME).read_bytes() == (b / syn.SHEET_NAME).read_bytes()
        assert syn.load_meta(a) == syn.load_meta(b)
        fa, fb = _frames(a), _frames(b)
        assert fa.keys() == fb.keys() and len(fa) > 100
        for key in fa:
            np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_different_seed_differs(tiny, tmp_path):
    cfg = syn.tiny_synme_config(1)
    assert cfg.fingerprint() != syn.tiny_synme_config(0).fingerprint()
    other = syn.generate_synme(cfg, tmp_path / "s1")
    name = cfg.databases[0].name
    sheet = syn.SHEET_NAME
    assert (tiny / name / sheet).read_bytes() != (other / name / sheet).read_bytes()
    first = sorted((tiny / name / syn.FRAME_ROOT / "sub01").iterdir())[0]
    other_first = sorted((other / name / syn.FRAME_ROOT / "sub01").iterdir())[0]
    a = cv2.imread(str(next(first.glob("*.jpg"))))
    b = cv2.imread(str(next(other_first.glob("*.jpg"))))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_ensure_synme_generates_once_and_per_config(tiny):
    cache = tiny.parent
    stamp = (tiny / syn.ROOT_META_NAME).stat().st_mtime_ns
    sheet = (tiny / "tinyA" / syn.SHEET_NAME).stat().st_mtime_ns
    assert syn.ensure_synme(syn.tiny_synme_config(0), cache) == tiny
    assert (tiny / syn.ROOT_META_NAME).stat().st_mtime_ns == stamp
    assert (tiny / "tinyA" / syn.SHEET_NAME).stat().st_mtime_ns == sheet
    assert tiny.name == f"synme-{syn.tiny_synme_config(0).fingerprint()[:12]}"

    changed = _clean_config()
    changed.databases[0].clips_per_subject = (1, 1)
    root = syn.ensure_synme(changed, cache)
    assert root != tiny and (root / syn.ROOT_META_NAME).exists()
    saved = json.loads((root / syn.ROOT_META_NAME).read_text())
    assert saved["fingerprint"] == changed.fingerprint() and saved["version"] == syn.VERSION
    assert syn.SynMEConfig.from_dict(saved["config"]) == changed
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(syn, "_write_database", fail)
    cfg = _clean_config()
    cfg.databases[0].n_subjects, cfg.databases[0].clips_per_subject = 1, (1, 1)
    with pytest.raises(RuntimeError):
        syn.ensure_synme(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sheet_header_matches_real_casme2(tiny):
    if not CASME2_FIXTURE.exists():
        pytest.skip(f"real CASME II sheet not available: {CASME2_FIXTURE}")
    real = list(pd.read_excel(CASME2_FIXTURE, nrows=0).columns)
    ours = list(pd.read_excel(tiny / "tinyA" / syn.SHEET_NAME, nrows=0).columns)
    assert ours == real


def test_sheet_rows_match_the_frames_and_meta(tiny):
    for spec in syn.tiny_synme_config(0).databases:
        db_dir = tiny / spec.name
        sheet = pd.read_excel(db_dir / syn.SHEET_NAME)
        meta = syn.load_meta(db_dir)
        assert len(sheet) == spec.n_subjects * spec.clips_per_subject[0]
        for row in sheet.itertuples(index=False):
            subject = f"sub{int(row.Subject):02d}"
            info = meta["subjects"][subject]["clips"][row.Filename]
            onset, apex, offset = row[3], row[4], row[5]
            assert (onset, apex, offset) == (info["onset"], info["apex"], info["offset"])
            assert info["first_frame"] < onset < apex < offset < info["last_frame"]
            assert str(row[7]) == info["action_units"] and row[8] == info["emotion"]
            parsed = parse_au_string(row[7])
            assert parsed.aus and not parsed.unknown and set(parsed.aus) <= set(syn.AU_LIST)
            folder = db_dir / syn.FRAME_ROOT / subject / row.Filename
            numbers = sorted(int(p.stem[3:]) for p in folder.glob("img*.jpg"))
            assert numbers == list(range(info["first_frame"], info["last_frame"] + 1))
            img = cv2.imread(str(folder / f"img{apex}.jpg"), cv2.IMREAD_UNCHANGED)
            assert img.shape == ((spec.height, spec.width, 3) if spec.color
                                 else (spec.height, spec.width))


def test_apex_displacement_is_micro(tiny):
    n = 0
    for db_dir, _, subject, clip, _info in _clips(tiny):
        field = syn.apex_displacement(db_dir, subject, clip)
        peak = float(np.sqrt((field**2).sum(-1)).max())
        assert 0.3 <= peak <= 2.5, (db_dir.name, subject, clip, peak)
        n += 1
    assert n == 24


def test_meta_recomputes_the_renderer_field(tiny):
    db_dir = tiny / "tinyA"
    meta = syn.load_meta(db_dir)
    sub = meta["subjects"]["sub01"]
    clip, info = next(iter(sub["clips"].items()))
    expected = syn.au_displacement(np.array(sub["landmarks"]), info["au_intensity"], 96, 88)
    np.testing.assert_array_equal(syn.apex_displacement(db_dir, 1, clip), expected)
    assert len(sub["landmarks"]) == 68


@pytest.mark.parametrize("clean", [True, False])
def test_onset_to_apex_is_the_known_warp(tiny, tmp_path, clean):
    root = syn.generate_synme(_clean_config(), tmp_path / "clean") if clean else tiny
    for db_dir, spec, subject, clip, info in _clips(root):
        if any(info["apex"] - 2 <= f <= info["apex"] + 2 for f in info["blink_frames"]):
            continue
        onset = _read(db_dir, subject, clip, info["onset"])
        apex = _read(db_dir, subject, clip, info["apex"])
        d = syn.apex_displacement(db_dir, subject, clip)
        yy, xx = np.mgrid[0:spec["height"], 0:spec["width"]].astype(np.float32)
        warped = cv2.remap(onset, xx - d[..., 0], yy - d[..., 1], cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
        mag = np.sqrt((d**2).sum(-1))
        region = mag > 0.5 * mag.max()
        err_warped = np.abs(warped - apex)[region].mean()
        err_onset = np.abs(onset - apex)[region].mean()
        ratio = 0.6 if clean else 0.9
        assert err_warped < ratio * err_onset, (subject, clip, err_warped, err_onset)


def test_au_fields_point_the_anatomical_way():
    ident = syn._draw_identity(np.random.default_rng(0), syn.tiny_synme_config().databases[0])
    lm = syn._to_px(ident, syn._landmarks_units(ident))

    def at(field, i):
        x, y = np.round(lm[i]).astype(int)
        return field[y, x]

    f12 = syn.au_displacement(lm, {12: 1.5}, 96, 88)
    assert at(f12, 48)[0] < 0 and at(f12, 48)[1] < 0  # image-left corner: out and up
    assert at(f12, 54)[0] > 0 and at(f12, 54)[1] < 0
    assert at(syn.au_displacement(lm, {4: 1.0}, 96, 88), 21)[1] > 0  # brows down
    assert at(syn.au_displacement(lm, {1: 1.0}, 96, 88), 21)[1] < 0  # inner brow up
    assert at(syn.au_displacement(lm, {15: 1.0}, 96, 88), 48)[1] > 0  # corners down
    assert at(syn.au_displacement(lm, {26: 1.0}, 96, 88), 8)[1] > 0  # jaw down
    r14 = syn.au_displacement(lm, {"R14": 1.0}, 96, 88)
    assert abs(at(r14, 48)[0]) > 0.5 and np.abs(at(r14, 54)).max() < 0.05  # one side only
    big = syn.au_displacement(lm, {1: 2.4, 2: 2.4}, 96, 88)
    assert np.sqrt((big**2).sum(-1)).max() <= syn.MAX_DISPLACEMENT_PX + 1e-4


def test_emotions_draw_their_aus():
    rng = np.random.default_rng(0)

    def share(emotion: str, aus: set[int], n: int = 400) -> float:
        hits = 0
        for _ in range(n):
            drawn = {syn._parse_au_key(k)[1] for k in syn._draw_aus(emotion, rng, 1.0)}
            hits += bool(drawn & aus)
        return hits / n

    assert share("happiness", {6, 12}) > 0.9
    for other in ("anger", "disgust", "sadness", "surprise", "repression"):
        assert share(other, {6, 12}) < 0.25, other
    assert share("surprise", {1, 2, 5, 25, 26}) > 0.9
    assert share("disgust", {9, 10}) > 0.7 > share("anger", {9, 10})
    assert share("sadness", {1, 15}) > 0.8
    # coordinated pairs shape co-occurrence: AU4 raises AU9/10 within disgust
    draws = [set(syn._draw_aus("disgust", rng, 1.0)) for _ in range(2000)]
    with4 = [d for d in draws if "4" in d]
    without4 = [d for d in draws if "4" not in d]
    assert np.mean(["9" in d for d in with4]) > np.mean(["9" in d for d in without4]) + 0.05


def test_generated_labels_follow_the_class_balance(tiny):
    counts = Counter(info["emotion"] for _, _, _, _, info in _clips(tiny))
    allowed = set(syn.tiny_synme_config().databases[0].emotion_weights)
    assert set(counts) <= allowed and sum(counts.values()) == 24
    estimated = [info for *_, info in _clips(tiny) if info["au_emotion"] != info["emotion"]]
    assert len(estimated) <= 6


def test_config_round_trip_and_validation():
    cfg = syn.default_synme_config(3)
    again = syn.SynMEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert [d.name for d in cfg.databases] == ["synA", "synB", "synC"]
    assert not cfg.databases[1].color and cfg.databases[2].fps == 100
    omegaconf = pytest.importorskip("omegaconf")
    container = omegaconf.OmegaConf.to_container(omegaconf.OmegaConf.create(cfg.to_dict()))
    assert syn.SynMEConfig.from_dict(container).fingerprint() == cfg.fingerprint()
    changed = dataclasses.replace(cfg.databases[0], noise_sigma=2.0)
    assert syn.SynMEConfig(3, [changed, *cfg.databases[1:]]).fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="unknown emotions"):
        syn.SynDatabaseSpec("x", 100, 96, 88, True, 1, (1, 1), {"joy": 1.0})
