"""Face geometry, AU regions, apex estimation and magnification: known answers, no detector."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from mer.data.preprocess.align import (
    alignment_matrix,
    eye_angle,
    resize_points,
    transform_points,
    warp,
)
from mer.data.preprocess.apex import estimate_apex, frame_path, motion_curve
from mer.data.preprocess.face import JAW_OVAL, MESH_TO_IBUG68, mesh_to_ibug68
from mer.data.preprocess.magnify import bandpass, collapse, laplacian_pyramid, magnify
from mer.data.preprocess.regions import AU_REGIONS, landmark_patches, region_boxes, region_masks
from mer.data.synthetic import _draw_identity, _landmarks_units, _to_px, tiny_synme_config


def _landmarks(seed: int = 0) -> np.ndarray:
    spec = tiny_synme_config().databases[0]
    ident = _draw_identity(np.random.default_rng(seed), spec)
    return _to_px(ident, _landmarks_units(ident))


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (h, w)).astype(np.float32), (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min()) * 200 + 25
    return img.astype(np.uint8)


def test_mesh_mapping_covers_ibug68_once():
    assert set(MESH_TO_IBUG68) | set(range(17)) | {28, 29} == set(range(68))
    used = [i for ids in MESH_TO_IBUG68.values() for i in ids] + list(JAW_OVAL)
    assert max(used) < 468


def test_mesh_to_ibug68_jaw_is_evenly_resampled_and_ends_kept():
    mesh = np.zeros((468, 2))
    t = np.linspace(0, math.pi, len(JAW_OVAL))
    mesh[list(JAW_OVAL)] = np.stack([50 - 40 * np.cos(t), 40 + 50 * np.sin(t)], axis=1)
    mesh[168], mesh[4] = (50, 40), (50, 70)
    lm = mesh_to_ibug68(mesh)
    assert np.allclose(lm[0], mesh[JAW_OVAL[0]]) and np.allclose(lm[16], mesh[JAW_OVAL[-1]])
    steps = np.linalg.norm(np.diff(lm[:17], axis=0), axis=1)
    assert steps.std() / steps.mean() < 0.05
    assert np.allclose(lm[28], [50, 50]) and np.allclose(lm[29], [50, 60])  # thirds of 27-30


def test_alignment_levels_the_eyes_and_centres_the_face():
    lm = _landmarks()
    centre = lm.mean(axis=0)
    rot = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), -12.0, 1.0)
    tilted = transform_points(lm, rot)
    assert abs(eye_angle(tilted) - eye_angle(lm) - 12.0) < 1e-6  # y down: -12 turns clockwise
    m = alignment_matrix(tilted, 128, margin=0.1)
    out = transform_points(tilted, m)
    assert abs(eye_angle(out)) < 1e-6
    assert (out >= 0).all() and (out <= 127).all()
    span = out.max(axis=0) - out.min(axis=0)
    assert 128 / 1.25 < span.max() < 128  # the face box fills the crop up to its margin


def test_warp_moves_image_content_with_the_points():
    img = np.zeros((90, 80), np.uint8)
    cv2.circle(img, (30, 40), 3, 255, -1)
    m = alignment_matrix(_landmarks(), 64)
    crop = warp(img, m, 64)
    ys, xs = np.nonzero(crop > 60)
    expect = transform_points([[30, 40]], m)[0]
    assert np.hypot(xs.mean() - expect[0], ys.mean() - expect[1]) < 0.5


def test_resize_points_maps_pixel_centres():
    assert np.allclose(resize_points([[0, 0], [127, 127]], 128, 28),
                       [[-0.5 + 0.5 * 28 / 128] * 2, [27.5 - 0.5 * 28 / 128] * 2])


def test_regions_match_the_model():
    from mer.models.dpk_gat import AU_REGIONS as MODEL_REGIONS

    assert [(n, tuple(p), tuple(a)) for n, p, a in MODEL_REGIONS] == [
        (n, p, a) for n, (p, a) in AU_REGIONS.items()]


def test_region_boxes_and_masks_hold_their_landmarks():
    lm = _landmarks() * 1.2
    boxes = region_boxes(lm)
    masks = region_masks(lm, 128)
    for name, (ids, _) in AU_REGIONS.items():
        pts = lm[list(ids)]
        x0, y0, x1, y1 = boxes[name]
        assert (pts[:, 0] > x0).all() and (pts[:, 0] < x1).all()
        assert (pts[:, 1] > y0).all() and (pts[:, 1] < y1).all()
        r = np.round(pts).astype(int)
        assert masks[name][r[:, 1], r[:, 0]].all()
    assert not (masks["brows"] & masks["mouth_chin"]).any()


def test_landmark_patches_read_the_image_at_the_points():
    yy, xx = np.mgrid[0:20, 0:30].astype(np.float32)
    image = np.stack([xx, yy])  # channel 0 = x, channel 1 = y
    patches = landmark_patches(image, np.array([[10.0, 5.0], [12.5, 7.25]]), side=5)
    assert patches.shape == (2, 2, 5, 5)
    assert np.allclose(patches[0, 0, 2], [8, 9, 10, 11, 12])
    assert np.allclose(patches[0, 1, :, 2], [3, 4, 5, 6, 7])
    assert np.isclose(patches[1, 0, 2, 2], 12.5) and np.isclose(patches[1, 1, 2, 2], 7.25)


def test_frame_path_keeps_names_and_padding():
    assert frame_path("/d/img46.jpg", 46, 50).name == "img50.jpg"
    assert frame_path("/d/006_05562.jpg", 5562, 5570).name == "006_05570.jpg"
    assert frame_path("/d/reg_img9.jpg", 9, 12).name == "reg_img12.jpg"
    with pytest.raises(ValueError, match="onset number 7"):
        frame_path("/d/img46.jpg", 7, 8)


def test_apex_is_the_frame_of_largest_local_motion():
    base = _texture(64, 64)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    bump = np.exp(-((xx - 40) ** 2 + (yy - 24) ** 2) / (2 * 6.0**2))  # a local movement
    amps = [0, 0.5, 1.2, 2.0, 1.4, 0.6]
    head = [0, 0.8, 1.6, 2.4, 3.2, 4.0]  # a growing global shift that must not count
    frames = [cv2.remap(base, xx - a * bump - h, yy, cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_REFLECT) for a, h in zip(amps, head)]
    curve = motion_curve(frames)
    assert curve[0] == 0 and np.argmax(curve) == 3
    assert estimate_apex(frames, [10, 11, 12, 13, 14, 15]) == 13


def test_laplacian_pyramid_reconstructs_and_bandpass_keeps_the_band():
    import torch

    x = torch.rand(6, 1, 33, 47)
    pyr = laplacian_pyramid(x, 4)
    assert len(pyr) == 4 and torch.allclose(collapse(pyr), x, atol=1e-5)
    t = torch.arange(64, dtype=torch.float32)
    sig = torch.sin(2 * math.pi * 5 * t / 64) + torch.sin(2 * math.pi * 20 * t / 64) + 3
    out = bandpass(sig[:, None], fps=64.0, low_hz=3.0, high_hz=8.0)[:, 0]
    assert torch.allclose(out, torch.sin(2 * math.pi * 5 * t / 64), atol=1e-4)


def test_magnify_amplifies_small_motion():
    base = _texture(64, 64, seed=1).astype(np.float32)
    n, fps = 16, 100.0
    shift = 0.3 * np.sin(2 * np.pi * 12.5 * np.arange(n) / fps)  # 12.5 Hz, 0.3 px
    frames = np.stack([cv2.warpAffine(base, np.float32([[1, 0, s], [0, 1, 0]]), (64, 64),
                                      borderMode=cv2.BORDER_REFLECT) for s in shift])
    same = magnify(frames, fps, alpha=0.0)
    assert np.abs(same - frames).max() < 1e-3  # alpha 0: the clip back
    big = magnify(frames, fps, alpha=4.0, low_hz=5.0, high_hz=20.0, levels=3, skip_levels=0)
    k = int(np.argmax(shift))

    def dx(a):
        flow = cv2.calcOpticalFlowFarneback(np.clip(a[0], 0, 255).astype(np.uint8),
                                            np.clip(a[k], 0, 255).astype(np.uint8), None,
                                            0.5, 3, 15, 3, 5, 1.2, 0)
        return float(np.median(flow[16:48, 16:48, 0]))

    assert dx(big) > 2.5 * dx(frames) > 0
