"""The on-disk preprocessing cache: content hashes, atomic writes, read-only and full disks."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mer.data.preprocess import pipeline
from mer.data.preprocess.cache import CacheError, FlowCache
from mer.data.preprocess.pipeline import FlowParams, flow_images

FAST = FlowParams(method="dis", work_size=32)
KEY = "ab" + "0" * 62
OTHER = "ab" + "1" * 62


def write_clips(folder: Path, n: int) -> pd.DataFrame:
    """n onset/apex PNG pairs (the apex a shifted onset) and their sample table."""
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        onset = cv2.GaussianBlur(rng.uniform(0, 255, (40, 36)).astype(np.uint8), (0, 0), 1.5)
        apex = np.roll(onset, i + 1, axis=1)
        on, ap = folder / f"on{i}.png", folder / f"ap{i}.png"
        cv2.imwrite(str(on), onset)
        cv2.imwrite(str(ap), apex)
        rows.append({"database": "t", "subject": f"s{i}", "clip": f"c{i}", "onset_path": str(on),
                     "apex_path": str(ap), "row": i + 2})
    return pd.DataFrame(rows)


@pytest.fixture
def count_flows(monkeypatch):
    calls = []
    real = pipeline.compute_flow

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute_flow", counting)
    return calls


def deny_writes(monkeypatch, root: Path) -> None:
    """Make creating files under ``root`` fail as on a read-only folder (tests run as root,
    where chmod does not stop writes)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 (tempfile's own name)
        if dir is not None and (Path(dir) == root or root in Path(dir).parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# ------------------------------------------------------------------------- content hashes


def test_entry_swapped_for_another_valid_entry_is_refused(tmp_path):
    table = write_clips(tmp_path, 2)
    cache = FlowCache(tmp_path / "cache")
    x, _, _ = flow_images(table, FAST, cache=cache, progress=False)
    assert not np.array_equal(x[0], x[1])
    entries = sorted(p for p in cache.root.rglob("*") if p.is_file())
    assert len(entries) == 2
    shutil.copy(entries[1], entries[0])  # a valid entry, but another clip's
    with pytest.raises(CacheError, match="content hash") as err:
        flow_images(table, FAST, cache=FlowCache(cache.root), progress=False)
    assert str(entries[0]) in str(err.value) and "delete it" in str(err.value)


def test_entry_rewritten_with_other_arrays_is_refused(tmp_path):
    cache = FlowCache(tmp_path)
    cache.put_arrays(KEY, {"flow": np.zeros((3, 4, 4), np.float32)})
    np.testing.assert_array_equal(cache.get_arrays(KEY)["flow"], 0)
    with open(cache.arrays_path(KEY), "wb") as f:  # valid arrays, written by something else
        np.savez(f, flow=np.ones((3, 4, 4), np.float32))
    with pytest.raises(CacheError, match="content hash") as err:
        cache.get_arrays(KEY)
    assert str(cache.arrays_path(KEY)) in str(err.value)

    cache.put(OTHER, np.zeros((3, 4, 4), np.float32))
    with open(cache.path(OTHER), "wb") as f:
        np.save(f, np.ones((3, 4, 4), np.float32))
    with pytest.raises(CacheError, match=f"{OTHER}.*delete it"):
        cache.get(OTHER)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.98])
def test_truncated_entry_is_an_error_naming_it(tmp_path, keep):
    cache = FlowCache(tmp_path)
    cache.put(KEY, np.random.default_rng(0).random((3, 28, 28)).astype(np.float32))
    data = cache.path(KEY).read_bytes()
    cache.path(KEY).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CacheError, match="delete it") as err:
        cache.get(KEY)
    assert str(cache.path(KEY)) in str(err.value)


def test_non_finite_entry_is_refused_at_load(tmp_path):
    cache = FlowCache(tmp_path)
    bad = np.zeros((3, 4, 4), np.float32)
    bad[1, 2, 3] = np.nan
    cache.put(KEY, bad)
    with pytest.raises(CacheError, match="non-finite") as err:
        cache.get(KEY)
    assert str(cache.path(KEY)) in str(err.value)

    cache.put_arrays(OTHER, {"flow": bad, "landmarks": np.full((68, 2), np.nan, np.float32)})
    assert np.isnan(cache.get_arrays(OTHER)["landmarks"]).all()  # NaN allowed where asked
    with pytest.raises(CacheError, match="'flow' holds non-finite"):
        cache.get_arrays(OTHER, finite=("flow",))


# --------------------------------------------------------------------------- writing


def test_a_failed_write_leaves_neither_entry_nor_temp(tmp_path, monkeypatch):
    def broken(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half an entry")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(np, "save", broken)
    monkeypatch.setattr(np, "savez", broken)
    cache = FlowCache(tmp_path)
    with pytest.raises(OSError, match="Input/output"):
        cache.put(KEY, np.zeros(3, np.float32))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert cache.get(KEY) is None


def test_disk_full_names_the_entry(tmp_path, monkeypatch):
    def full(file, *args, **kwargs):
        file.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    monkeypatch.setattr(np, "savez", full)
    cache = FlowCache(tmp_path)
    with pytest.raises(CacheError, match="disk is full") as err:
        cache.put(KEY, np.zeros(3, np.float32))
    assert str(cache.path(KEY)) in str(err.value)
    with pytest.raises(CacheError, match="disk is full"):
        cache.put_arrays(KEY, {"flow": np.zeros(3, np.float32)})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_read_only_cache_fails_before_computing(tmp_path, monkeypatch, count_flows):
    table = write_clips(tmp_path, 3)
    root = tmp_path / "cache"
    root.mkdir()
    deny_writes(monkeypatch, root)
    with pytest.raises(CacheError, match="not writable") as err:
        flow_images(table, FAST, cache=FlowCache(root), progress=False)
    assert str(root) in str(err.value)
    assert count_flows == []  # refused before any flow was computed


def test_read_only_warm_cache_still_serves(tmp_path, monkeypatch, count_flows):
    table = write_clips(tmp_path, 3)
    root = tmp_path / "cache"
    x, _, _ = flow_images(table, FAST, cache=FlowCache(root), progress=False)
    deny_writes(monkeypatch, root)
    again = FlowCache(root)
    y, _, _ = flow_images(table, FAST, cache=again, progress=False)
    assert again.hits == 3 and len(count_flows) == 3  # nothing computed the second time
    np.testing.assert_array_equal(x, y)
