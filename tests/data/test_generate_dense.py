"""Dense motion transfer (``motion: dense``, :mod:`mer.data.generate.dense`): the landmark
correspondence, the carried vectors, the inverse map, and on SynME the own-face re-render that
keeps a clip's flow better than the sparse TPS."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mer.data.generate.dense import backward_map, dense_motion, face_weight, landmark_map
from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import GenerateParams
from mer.data.generate.render import render_dense


def _face(scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A plausible iBUG-68 shape (jaw, brows, nose, eyes, mouth) in a 96 px frame."""
    rng = np.random.default_rng(0)
    t = np.linspace(-1.2, 1.2, 17)
    jaw = np.stack([48 + 30 * np.sin(t), 50 + 30 * np.cos(t) * 0.9], 1)
    brows = np.stack([np.r_[np.linspace(26, 44, 5), np.linspace(52, 70, 5)], np.full(10, 30.0)],
                     1)
    nose = np.stack([np.r_[np.full(4, 48.0), np.linspace(42, 54, 5)],
                     np.r_[np.linspace(36, 50, 4), np.full(5, 54.0)]], 1)
    eye = np.stack([np.cos(np.linspace(0, 2 * np.pi, 7)[:-1]) * 6,
                    np.sin(np.linspace(0, 2 * np.pi, 7)[:-1]) * 2.5], 1)
    eyes = np.r_[eye + [35, 38], eye + [61, 38]]
    mouth = np.stack([np.cos(np.linspace(0, 2 * np.pi, 21)[:-1]) * 12,
                      np.sin(np.linspace(0, 2 * np.pi, 21)[:-1]) * 4], 1) + [48, 66]
    lm = np.concatenate([jaw, brows, nose, eyes, mouth]) + rng.normal(0, 0.3, (68, 2))
    assert lm.shape == (68, 2)
    return lm * scale + np.asarray(shift)


def test_landmark_map_is_the_identity_on_its_own_face_and_exact_for_an_affine_pair():
    lm = _face()
    grid = np.stack(np.meshgrid(np.arange(96.0), np.arange(96.0)), -1)
    assert np.array_equal(landmark_map(lm, lm, 96, 96), grid.astype(np.float32))
    # a driver that is the source scaled by 1.5 and moved: a TPS reproduces an affine map
    drv = _face(1.5, (7.0, -3.0))
    where = landmark_map(lm, drv, 96, 96, driver_size=(150, 150))
    np.testing.assert_allclose(where, grid * 1.5 + [7.0, -3.0], atol=2e-2)


def test_dense_motion_carries_a_drivers_local_motion_to_the_same_place_scaled():
    src, drv = _face(), _face(2.0, (4.0, 6.0))  # the driver's face is twice as large
    h = w = 96
    flows = np.zeros((2, 200, 200, 2), np.float32)
    flows[:, :, :] = [3.0, -1.0]  # head motion: removed
    # the driver's left brow rises by 2 px (its own frame): on the source, 1 px at the brow
    brow = drv[17:22].mean(0)
    yy, xx = np.mgrid[0:200, 0:200]
    bump = np.exp(-((xx - brow[0]) ** 2 + (yy - brow[1]) ** 2) / (2 * 6.0 ** 2))
    flows[1, ..., 1] += -2.0 * bump
    out = dense_motion(flows, drv, src, h, w)
    assert out.shape == (2, h, w, 2)
    assert np.abs(out[0]).max() < 1e-4  # only the head moved: nothing left
    at = np.rint(src[17:22].mean(0)).astype(int)
    np.testing.assert_allclose(out[1, at[1], at[0]], [0.0, -1.0], atol=0.05)
    far = np.rint(src[26]).astype(int)  # the other brow's end: still
    assert np.abs(out[1, far[1], far[0]]).max() < 0.05
    assert np.abs(out[1, 2, 2]).max() == 0  # off the face: the background stays


def test_face_weight_covers_the_forehead_and_is_zero_far_away():
    lm = _face()
    wgt = face_weight(lm, 96, 96)
    brows_y = lm[17:27, 1].mean()
    assert wgt[int(brows_y) - 4, 48] > 0.9  # above the brows: the forehead moves too
    assert wgt[2, 2] < 1e-6 and wgt[95, 95] < 1e-6
    assert 0 <= wgt.min() and wgt.max() <= 1.0 + 1e-6


def test_backward_map_inverts_a_smooth_forward_field():
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float32)
    field = np.stack([2.5 * np.exp(-((xx - 40) ** 2 + (yy - 35) ** 2) / 200.0),
                      -1.5 * np.exp(-((xx - 30) ** 2 + (yy - 45) ** 2) / 150.0)], -1)
    back = backward_map(field)
    # where each input point went (x + field(x)) maps back to x
    pts = np.stack([xx, yy], -1)[10:70:7, 10:70:7].reshape(-1, 2)
    moved = pts + field[10:70:7, 10:70:7].reshape(-1, 2)
    got = np.stack([cv2.remap(back[..., c], moved[:, :1].astype(np.float32),
                              moved[:, 1:].astype(np.float32), cv2.INTER_LINEAR)[:, 0]
                    for c in range(2)], -1)
    np.testing.assert_allclose(got, pts, atol=0.03)
    # first order alone (x = y - field(y)) is off by up to ~0.1 px here: the iteration matters
    first = np.stack([xx, yy], -1) - field
    got1 = np.stack([cv2.remap(first[..., c], moved[:, :1].astype(np.float32),
                               moved[:, 1:].astype(np.float32), cv2.INTER_LINEAR)[:, 0]
                     for c in range(2)], -1)
    assert np.abs(got1 - pts).max() > 3 * np.abs(got - pts).max()


def test_render_dense_moves_a_texture_as_the_field_says():
    rng = np.random.default_rng(1)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (96, 96)).astype(np.float32), (0, 0), 2.0)
    tex = cv2.normalize(tex, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    field = np.stack([1.5 * np.exp(-((xx - 48) ** 2 + (yy - 48) ** 2) / 300.0),
                      np.zeros_like(xx)], -1)
    frames = render_dense(tex, np.stack([np.zeros_like(field), field, np.zeros_like(field)]), 5)
    assert len(frames) == 5 and np.array_equal(frames[0], tex)
    apex = frames[2]
    flow = cv2.calcOpticalFlowFarneback(tex, apex, None, 0.5, 3, 9, 5, 5, 1.1, 0)
    inner = (slice(30, 66), slice(30, 66))
    assert np.linalg.norm(flow[inner] - field[inner], axis=-1).mean() < 0.2
    assert np.abs(frames[4].astype(int) - tex).max() <= 1  # the offset is back at rest
    with pytest.raises(GenerationError, match="px"):
        render_dense(tex, np.zeros((3, 50, 50, 2), np.float32), 5)


def test_motion_is_checked_and_tps_keeps_the_old_cache_key():
    with pytest.raises(GenerationError, match="motion='flow'.*tps.*dense"):
        GenerateParams(motion="flow")
    assert "motion" not in GenerateParams().key()
    assert '"motion": "dense"' in GenerateParams(motion="dense").key()


def test_own_face_dense_keeps_the_clips_flow_better_than_tps(tiny_a, tmp_path):
    """SynME (synthetic): each clip re-rendered on its own face by its own motion; the flow of
    the re-render against the original clip's flow (head motion removed), over the face."""
    from mer.data.generate.augment import clip_ids, clips_of
    from mer.data.generate.generator import DrivenGenerator
    from mer.data.generate.motion import read_grey
    from mer.data.preprocess.flow import compute_flow

    clips, ids = clips_of(tiny_a), clip_ids(tiny_a.meta)[:6]
    errors, size = {}, []
    for motion in ("tps", "dense"):
        gen = DrivenGenerator(clips, GenerateParams(drivers=1, flow={"method": "tvl1"},
                                                    motion=motion), tmp_path / motion)
        err = []
        for cid in ids:
            rec, c = gen.generate(cid, cid, [cid]), clips[cid]
            orig = compute_flow(read_grey(c, c.onset), read_grey(c, c.apex), "tvl1")
            made = compute_flow(cv2.imread(rec["onset_path"], 0), cv2.imread(rec["apex_path"], 0),
                                "tvl1")
            face = face_weight(gen.landmarks(cid), *orig.shape[:2]) > 0.5
            orig = orig - np.median(orig[face], axis=0)
            err.append(np.linalg.norm((made - orig)[face], axis=-1).mean())
            size.append(np.linalg.norm(orig[face], axis=-1).mean())
        errors[motion] = float(np.mean(err))
    assert errors["dense"] < 0.85 * errors["tps"], errors
    assert errors["dense"] < 0.75 * float(np.mean(size)), (errors, np.mean(size))
