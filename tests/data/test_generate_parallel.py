"""DrivenGenerator.generate_many: a pool of workers makes the sequences one process makes,
resumes where it stopped, and checks every job's classes before rendering anything."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from mer.data.generate.augment import clip_ids, clips_of
from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import DONE, DrivenGenerator, GenerateParams

PARAMS = GenerateParams(drivers=2, phases=3, frames=5)


def _jobs(samples, n: int = 6) -> list[tuple[str, str, list[str]]]:
    """The first ``n`` clips, each driven by itself and another clip of its class, on the next
    subject's face."""
    ids, labels = clip_ids(samples.meta), samples.meta["label"].to_numpy()
    jobs = []
    for i, cid in enumerate(ids[:n]):
        same = [ids[j] for j in np.flatnonzero(labels == labels[i]) if j != i]
        source = ids[(i + 3) % len(ids)]
        jobs.append((cid, source, [cid, *same[:1]]))
    return jobs


def _frames(record: dict, n: int) -> np.ndarray:
    folder = Path(record["folder"])
    return np.stack([cv2.imread(str(folder / f"img{k}.jpg")) for k in range(1, n + 1)])


def test_a_pool_makes_what_one_process_makes(tiny_a, tmp_path):
    clips, names = clips_of(tiny_a), tiny_a.class_names
    jobs = _jobs(tiny_a)
    one = DrivenGenerator(clips, PARAMS, tmp_path / "one", names)
    pool = DrivenGenerator(clips, PARAMS, tmp_path / "pool", names)
    serial = one.generate_many(jobs, workers=0, progress=False)
    pooled = pool.generate_many(jobs, workers=2, progress=False)

    assert [r["key"] for r in serial] == [r["key"] for r in pooled]  # same content keys
    assert one._flows.keys() == pool._flows.keys()  # the workers' flows came back
    for key, flows in one._flows.items():
        np.testing.assert_array_equal(flows, pool._flows[key])  # one OpenCV thread in both
    for a, b in zip(serial, pooled, strict=True):
        assert (Path(b["folder"]) / DONE).exists()
        fa, fb = _frames(a, PARAMS.frames).astype(int), _frames(b, PARAMS.frames).astype(int)
        # torch's thread count may move a warp coordinate by ~1e-6 px: a JPEG level at most
        assert np.abs(fa - fb).max() <= 2 and np.abs(fa - fb).mean() < 0.05


def test_a_pool_redoes_only_what_is_not_finished(tiny_a, tmp_path):
    clips, names = clips_of(tiny_a), tiny_a.class_names
    jobs = _jobs(tiny_a)
    records = DrivenGenerator(clips, PARAMS, tmp_path, names).generate_many(
        jobs, workers=2, progress=False)
    cut = records[4]
    (Path(cut["folder"]) / DONE).unlink()  # interrupted while writing this one
    (Path(cut["folder"]) / "img3.jpg").unlink()
    before = {r["key"]: (Path(r["folder"]) / "img1.jpg").stat().st_mtime_ns for r in records}

    again = DrivenGenerator(clips, PARAMS, tmp_path, names)
    assert again.generate_many(jobs, workers=2, progress=False) == records
    # only the unfinished job's drivers had their flows computed
    assert {k[0] for k in again._flows} == set(jobs[4][2])
    assert (Path(cut["folder"]) / DONE).exists() and (Path(cut["folder"]) / "img3.jpg").exists()
    for r in records:
        if r["key"] != cut["key"]:
            assert (Path(r["folder"]) / "img1.jpg").stat().st_mtime_ns == before[r["key"]]


def test_a_driver_of_another_class_stops_the_pool_before_anything_is_rendered(tiny_a,
                                                                               tmp_path):
    clips, names = clips_of(tiny_a), tiny_a.class_names
    ids, labels = clip_ids(tiny_a.meta), tiny_a.meta["label"].to_numpy()
    other = ids[int(np.flatnonzero(labels != labels[0])[0])]
    jobs = _jobs(tiny_a) + [(ids[0], ids[1], [ids[0], other])]
    with pytest.raises(GenerationError, match=f"driving clip {other} is of class"):
        DrivenGenerator(clips, PARAMS, tmp_path, names).generate_many(jobs, workers=2,
                                                                     progress=False)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
