"""Driven generation's motion model: TPS warps, alignment, fusion, bad input (known answers)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mer.data.generate.align import similarity, transfer
from mer.data.generate.errors import GenerationError
from mer.data.generate.generator import GenerateParams
from mer.data.generate.motion import Clip, check_classes, face_landmarks, fuse_motions
from mer.data.generate.render import motion_at, render_sequence
from mer.data.generate.tps import tps_backward_map, tps_field, tps_warp


def _texture(h: int = 96, w: int = 88, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)), (0, 0), 2)
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _grid() -> np.ndarray:
    return np.stack(np.meshgrid(np.linspace(30, 58, 5), np.linspace(30, 66, 5)), -1).reshape(-1, 2)


def test_tps_field_is_exact_at_control_points_and_still_on_the_border():
    pts = _grid()
    disp = np.random.default_rng(1).normal(0, 1.0, pts.shape)
    field = tps_field(pts, disp, 96, 88)
    at = field[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    np.testing.assert_allclose(at, disp, atol=1e-3)
    from mer.data.generate.tps import border_points

    anchors = np.rint(border_points(96, 88)).astype(int)
    assert np.abs(field[anchors[:, 1], anchors[:, 0]]).max() < 0.05  # pinned (px rounding)
    edge = np.concatenate([field[0], field[-1], field[:, 0], field[:, -1]])
    assert np.linalg.norm(edge, axis=1).mean() < 0.3 * np.linalg.norm(disp, axis=1).mean()


def test_tps_warp_moves_content_by_the_displacement():
    """A patch moved by (1.5, -1) px: the optical flow of the warp sees that motion there."""
    img = _texture()
    pts = _grid()
    disp = np.tile([1.5, -1.0], (len(pts), 1))
    out = tps_warp(img, pts, disp)
    flow = cv2.optflow.DualTVL1OpticalFlow_create().calc(img, out, None)
    np.testing.assert_allclose(flow[40:56, 38:50].mean(axis=(0, 1)), [1.5, -1.0], atol=0.15)
    # the backward map renders the same frame as kornia's warp_image_tps
    m = tps_backward_map(pts, disp, *img.shape)
    again = cv2.remap(img, m[..., 0], m[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    assert np.abs(again.astype(int) - out.astype(int))[8:-8, 8:-8].mean() < 1.5


def test_similarity_recovers_a_known_transform_and_transfer_rotates_vectors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(68, 2)) * 10
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    b = 2.0 * a @ rot.T + [5.0, -3.0]
    s, r, t = similarity(a, b)
    assert s == pytest.approx(2.0) and np.allclose(r, rot) and np.allclose(t, [5, -3])
    np.testing.assert_allclose(transfer(np.array([[1.0, 0.0]]), a, b), [[0.0, 2.0]], atol=1e-9)


def test_fusion_is_the_median_of_the_aligned_motions():
    lm = np.random.default_rng(0).normal(size=(68, 2)) * 10
    motions = [np.full((3, 4, 2), v) for v in (1.0, 2.0, 10.0)]
    fused = fuse_motions(motions, [lm, lm, lm * 2.0], lm)  # the third face is twice as large
    np.testing.assert_allclose(fused, 2.0)  # median of 1, 2, 10 * 0.5 = 5 -> 2
    np.testing.assert_allclose(fuse_motions(motions, [lm] * 3, lm, "mean"), 13 / 3)


def test_a_driver_of_another_class_is_refused_naming_the_clip():
    target = Clip("synA/sub01/EP01", "synA/sub01", 0, "x.jpg", 1, 3)
    other = Clip("synA/sub02/EP07", "synA/sub02", 2, "y.jpg", 1, 3)
    with pytest.raises(GenerationError, match=r"synA/sub02/EP07.*'surprise'.*synA/sub01/EP01"):
        check_classes(target, [target, other], ["negative", "positive", "surprise"])


def test_a_source_without_a_face_is_refused_naming_it():
    blank = np.full((96, 88, 3), 128, np.uint8)
    with pytest.raises(GenerationError, match="clip synA/sub03/EP02.*no face landmarks"):
        face_landmarks(blank, "clip synA/sub03/EP02")  # the real MediaPipe detector


def test_render_starts_on_the_source_and_peaks_at_the_apex():
    img = _texture()
    lm = np.random.default_rng(2).uniform(25, 70, size=(68, 2))
    from mer.data.generate.motion import triangles

    tri = triangles(lm)
    m = np.zeros((3, 68 + len(tri), 2))
    m[1] = [1.0, 0.0]  # apex knot
    frames = render_sequence(img, lm, tri, m, 5)
    assert np.array_equal(frames[0], img) and len(frames) == 5
    diff = [np.abs(f.astype(int) - img.astype(int)).mean() for f in frames]
    assert diff[2] == max(diff) and diff[1] < diff[2] and diff[3] < diff[2]
    np.testing.assert_allclose(motion_at(m, 0.25), 0.5 * m[1])
    with pytest.raises(GenerationError, match="odd"):
        render_sequence(img, lm, tri, m, 4)


def test_generate_params_refuse_bad_values():
    with pytest.raises(GenerationError, match="phases"):
        GenerateParams(phases=4)
    with pytest.raises(GenerationError, match="fusion"):
        GenerateParams(fusion="max")
