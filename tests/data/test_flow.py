"""Flow, strain, the flow-image pipeline and its cache."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data.preprocess import pipeline
from mer.data.preprocess.cache import CacheError, FlowCache, cache_key
from mer.data.preprocess.flow import compute_flow
from mer.data.preprocess.pipeline import (
    FlowParams,
    PreprocessError,
    flow_image,
    flow_images,
    minmax_normalise,
)
from mer.data.preprocess.strain import optical_strain


def texture(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """(h, w) uint8 smoothed random texture."""
    noise = np.random.default_rng(seed).uniform(0, 255, (h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Content moved by (+dx, +dy) pixels."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(image, m, image.shape[1::-1], flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


def write_clips(folder: Path, n: int = 6) -> pd.DataFrame:
    """n onset/apex PNG pairs (shift growing with the clip) and their sample table."""
    rows = []
    for i in range(n):
        onset = texture(90, 80, seed=i)
        apex = shift(onset, 0.4 + 0.3 * i, -0.5)
        onset_path, apex_path = folder / f"on{i}.png", folder / f"ap{i}.png"
        cv2.imwrite(str(onset_path), onset)
        cv2.imwrite(str(apex_path), apex)
        rows.append({"database": "t", "subject": f"s{i % 3}", "clip": f"c{i}",
                     "onset_path": str(onset_path), "apex_path": str(apex_path), "row": i + 2})
    return pd.DataFrame(rows)


FAST = FlowParams(method="dis", work_size=64)


# ------------------------------------------------------------------------------------- strain


@pytest.mark.parametrize("a, b, c, d", [(0.3, -0.2, 0.5, 0.1), (0.0, -0.4, 0.4, 0.0),
                                        (1.0, 0.0, 0.0, -2.0)])
def test_strain_of_linear_flow_is_constant(a, b, c, d):
    ys, xs = np.mgrid[0:20, 0:30].astype(np.float32)
    flow = np.stack([a * xs + b * ys, c * xs + d * ys], axis=-1)
    strain = optical_strain(flow)
    assert strain.shape == (20, 30) and strain.dtype == np.float32
    expected = np.sqrt(a**2 + d**2 + 0.5 * (b + c) ** 2)
    np.testing.assert_allclose(strain[1:-1, 1:-1], expected, atol=1e-5)


def test_strain_picks_up_local_deformation():
    flow = np.zeros((21, 21, 2), np.float32)
    flow[10, 10, 0] = 1.0  # one pixel moves right
    strain = optical_strain(flow)
    assert strain[10, 9] == pytest.approx(0.5) and strain[10, 11] == pytest.approx(0.5)
    assert strain[0, 0] == 0 and strain[10, 10] == 0


def test_strain_rejects_bad_shape():
    with pytest.raises(ValueError, match="H, W, 2"):
        optical_strain(np.zeros((5, 5, 3)))


# --------------------------------------------------------------------------------------- flow


@pytest.mark.parametrize("method", ["tvl1", "dis", "farneback"])
@pytest.mark.parametrize("dx, dy", [(0.6, -0.4), (1.5, 1.0)])
def test_flow_recovers_translation(method, dx, dy):
    onset = texture()
    flow = compute_flow(onset, shift(onset, dx, dy), method)
    assert flow.shape == (96, 96, 2) and flow.dtype == np.float32
    inner = flow[16:-16, 16:-16]
    assert inner[..., 0].mean() == pytest.approx(dx, abs=0.15)
    assert inner[..., 1].mean() == pytest.approx(dy, abs=0.15)


def test_flow_accepts_bgr():
    onset = texture()
    apex = shift(onset, 1.0, 0.5)
    bgr = [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) for im in (onset, apex)]
    np.testing.assert_array_equal(compute_flow(*bgr, "dis"), compute_flow(onset, apex, "dis"))


def test_flow_params_are_passed_on():
    onset = texture()
    apex = shift(onset, 1.0, 0.5)
    base = compute_flow(onset, apex, "tvl1")
    assert not np.array_equal(base, compute_flow(onset, apex, "tvl1", nscales=1, warps=1))
    # `lambda` (as configs write it) is OpenCV's `lambda_`
    np.testing.assert_array_equal(compute_flow(onset, apex, "tvl1", **{"lambda": 0.05}),
                                  compute_flow(onset, apex, "tvl1", lambda_=0.05))


def test_flow_rejects_unknowns():
    image = texture()
    with pytest.raises(ValueError, match="tvl1.*farneback.*dis"):
        compute_flow(image, image, "lucas")
    with pytest.raises(ValueError, match="nscale"):
        compute_flow(image, image, "tvl1", nscale=3)
    with pytest.raises(ValueError, match="differ in size"):
        compute_flow(image, image[:50], "dis")


# ----------------------------------------------------------------------------------- pipeline


def test_minmax_normalise_per_channel():
    stack = np.stack([np.arange(12.0).reshape(3, 4) * 5 - 7,
                      np.full((3, 4), 3.0),
                      np.arange(12.0).reshape(3, 4) ** 2])
    out = minmax_normalise(stack)
    assert out.dtype == np.float32
    for c in (0, 2):
        assert out[c].min() == 0 and out[c].max() == 1
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_allclose(out[0], np.arange(12).reshape(3, 4) / 11, atol=1e-6)


def test_flow_image_shape_and_range(tmp_path):
    table = write_clips(tmp_path, 1)
    image = flow_image(table.onset_path[0], table.apex_path[0], FAST)
    assert image.shape == (3, 28, 28) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    assert (image.max(axis=(1, 2)) - image.min(axis=(1, 2)) > 0.3).all()
    big = flow_image(table.onset_path[0], table.apex_path[0],
                     FlowParams(method="dis", work_size=64, out_size=40))
    assert big.shape == (3, 40, 40)


def test_flow_params_key():
    assert FlowParams().key() == FlowParams().key()
    keys = {FlowParams().key(), FlowParams(method="dis").key(), FlowParams(out_size=32).key(),
            FlowParams(method_params={"tau": 0.2}).key(), FlowParams(grey=False).key()}
    assert len(keys) == 5
    with pytest.raises(ValueError, match="farneback"):
        FlowParams(method="nope")


def test_missing_and_corrupt_frames_are_named(tmp_path):
    table = write_clips(tmp_path, 1)
    with pytest.raises(PreprocessError, match="nothere.png") as err:
        flow_image(table.onset_path[0], tmp_path / "nothere.png", FAST, sample="t/s0/c0")
    assert "t/s0/c0" in str(err.value)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(PreprocessError, match="broken.png"):
        flow_image(bad, table.apex_path[0], FAST)
    with pytest.raises(PreprocessError, match="no frame path"):
        flow_image(table.onset_path[0], "", FAST)


def test_flow_images_matches_flow_image(tmp_path):
    table = write_clips(tmp_path, 3)
    x, kept, failures = flow_images(table, FAST, progress=False)
    assert x.shape == (3, 3, 28, 28) and list(kept) == [0, 1, 2] and failures == []
    for i in range(3):
        np.testing.assert_array_equal(x[i], flow_image(table.onset_path[i], table.apex_path[i],
                                                       FAST))


def _break(table: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Row 1 loses its apex file, row 4 gets a corrupt onset."""
    table = table.copy()
    table.loc[1, "apex_path"] = str(folder / "gone.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG garbage")
    table.loc[4, "onset_path"] = str(folder / "corrupt.png")
    return table


@pytest.mark.parametrize("use_cache", [False, True])
def test_on_error(tmp_path, use_cache):
    table = _break(write_clips(tmp_path, 6), tmp_path)
    cache = FlowCache(tmp_path / "cache") if use_cache else None
    with pytest.raises(PreprocessError, match="gone.png") as err:
        flow_images(table, FAST, cache=cache, progress=False)
    assert "t/s1/c1" in str(err.value) and "row 3" in str(err.value)

    x, kept, failures = flow_images(table, FAST, cache=cache, on_error="skip", progress=False)
    assert list(kept) == [0, 2, 3, 5] and len(x) == 4
    assert [(f["subject"], f["clip"]) for f in failures] == [("s1", "c1"), ("s1", "c4")]
    assert "gone.png" in failures[0]["reason"] and "corrupt.png" in failures[1]["reason"]
    assert set(failures[0]) == {"database", "subject", "clip", "reason"}
    with pytest.raises(ValueError, match="on_error"):
        flow_images(table, FAST, on_error="ignore")


def test_table_needs_columns():
    with pytest.raises(PreprocessError, match="apex_path"):
        flow_images(pd.DataFrame({"database": [], "subject": [], "clip": [], "onset_path": []}),
                    FAST, progress=False)


def test_workers_do_not_change_results(tmp_path):
    table = _break(write_clips(tmp_path, 6), tmp_path)
    params = FlowParams(method="tvl1", work_size=48)
    x0, kept0, fail0 = flow_images(table, params, workers=0, on_error="skip", progress=False)
    x2, kept2, fail2 = flow_images(table, params, workers=2, on_error="skip", progress=False)
    assert len(x0) == 4
    np.testing.assert_array_equal(x0, x2)
    np.testing.assert_array_equal(kept0, kept2)
    assert fail0 == fail2


# -------------------------------------------------------------------------------------- cache


@pytest.fixture
def count_flows(monkeypatch):
    calls = []
    real = pipeline.compute_flow

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute_flow", counting)
    return calls


def test_cache_hit_and_miss(tmp_path, count_flows):
    table = write_clips(tmp_path, 4)
    cache = FlowCache(tmp_path / "cache")
    x1, _, _ = flow_images(table, FAST, cache=cache, progress=False)
    assert len(count_flows) == 4 and cache.misses == 4 and cache.hits == 0

    again = FlowCache(tmp_path / "cache")
    x2, _, _ = flow_images(table, FAST, cache=again, progress=False)
    assert len(count_flows) == 4 and again.hits == 4
    np.testing.assert_array_equal(x1, x2)

    # new bytes in one frame: only that sample is recomputed
    cv2.imwrite(table.apex_path[2], shift(texture(90, 80, seed=2), -1.0, 0.7))
    x3, _, _ = flow_images(table, FAST, cache=FlowCache(tmp_path / "cache"), progress=False)
    assert len(count_flows) == 5
    np.testing.assert_array_equal(x3[[0, 1, 3]], x1[[0, 1, 3]])
    assert not np.array_equal(x3[2], x1[2])

    # a parameter change recomputes everything
    changed = FlowParams(method="dis", work_size=64, method_params={"preset": "fast"})
    flow_images(table, changed, cache=FlowCache(tmp_path / "cache"), progress=False)
    assert len(count_flows) == 9


def test_cache_key_depends_on_every_part():
    base = cache_key("a", "b", "p")
    assert base == cache_key("a", "b", "p")
    assert len({base, cache_key("x", "b", "p"), cache_key("a", "x", "p"),
                cache_key("a", "b", "x"), cache_key("a", "b", "p", version="0")}) == 5


def test_cache_store(tmp_path):
    cache = FlowCache(tmp_path)
    key = "ab" + "0" * 62
    assert cache.get(key) is None and key not in cache
    arr = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    cache.put(key, arr)
    assert cache.path(key) == tmp_path / "ab" / f"{key}.npz" and key in cache
    np.testing.assert_array_equal(cache.get(key), arr)
    assert [p.name for p in (tmp_path / "ab").iterdir()] == [f"{key}.npz"]  # no temp left
    cache.path(key).write_bytes(b"truncated")  # a damaged entry is an error naming it
    with pytest.raises(CacheError, match=f"{key}.npz is truncated or damaged.*delete it"):
        cache.get(key)
