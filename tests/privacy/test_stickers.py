"""Adversarial sticker primitives: rendering, placement checks, following the face, site
motion, causal ranking, the black-box query budget, and the flow of stickered clips."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from mer.data.preprocess.regions import AU_REGIONS
from mer.models.dpk_gat import FACE_TEMPLATE_68
from mer.privacy.stickers import (
    SITES,
    BlackBox,
    CausalDiscoveryError,
    QueryBudgetError,
    Sticker,
    StickerError,
    StickerStyle,
    causal_ranking,
    check_sticker,
)
from mer.privacy.stickers.features import site_motion
from mer.privacy.stickers.placement import (
    SITE_REGION,
    face_area,
    face_polygon,
    site_centre,
    sticker_frames,
)
from mer.privacy.stickers.styles import paste, polygon_area, render_alpha

SIZE = 120
LM = FACE_TEMPLATE_68.numpy().astype(np.float64) * 90 + 15  # a face in a 120 x 120 frame
STYLES = [StickerStyle("c", "circle"), StickerStyle("e", "circle", aspect=1.7),
          StickerStyle("r", "rectangle", (240, 240, 240), aspect=1.6),
          StickerStyle("s", "star", (40, 40, 220))]


def _texture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (SIZE, SIZE)).astype(np.float32), (0, 0), 2.0)
    img = (img - img.min()) / (img.max() - img.min()) * 200 + 30
    return img.astype(np.uint8)


@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.name)
@pytest.mark.parametrize("area", [30.0, 150.0, 600.0])
def test_a_rendered_sticker_covers_the_area_asked(style, area):
    poly = style.outline((60.3, 55.7), area, angle=17.0)
    assert polygon_area(poly) == pytest.approx(area, rel=1e-3)
    alpha = render_alpha(poly, (SIZE, SIZE))
    assert alpha.min() >= 0 and alpha.max() <= 1
    assert alpha.sum() == pytest.approx(area, rel=0.01)


def test_a_sub_pixel_move_moves_the_alpha_centroid_by_as_much():
    style = StickerStyle("s", "star")

    def centroid(c):
        a = render_alpha(style.outline(c, 200.0), (SIZE, SIZE))
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        return np.array([(a * xx).sum(), (a * yy).sum()]) / a.sum()

    d = centroid((50.3, 61.6)) - centroid((50.0, 61.0))
    np.testing.assert_allclose(d, [0.3, 0.6], atol=0.02)
    np.testing.assert_allclose(centroid((50.0, 61.0)), [50.0, 61.0], atol=0.05)


def test_paste_composites_the_colour_or_its_luma():
    grey = np.full((4, 4), 100, np.uint8)
    colour = np.full((4, 4, 3), 100, np.uint8)
    alpha = np.zeros((4, 4), np.float32)
    alpha[1, 1], alpha[2, 2] = 1.0, 0.5
    red = StickerStyle("r", "circle", (0, 0, 255))
    assert red.grey() == pytest.approx(76, abs=0.5)  # 0.299 * 255, OpenCV's luma
    out = paste(grey, alpha, red)
    assert out[0, 0] == 100 and out[1, 1] == 76 and out[2, 2] == 88
    out = paste(colour, alpha, red)
    assert out[0, 0].tolist() == [100, 100, 100] and out[1, 1].tolist() == [0, 0, 255]
    assert out[2, 2].tolist() == [50, 50, 178]


def test_sites_lie_inside_their_au_region_and_on_the_face():
    assert set(SITE_REGION.values()) <= set(AU_REGIONS)
    for site, ids in SITES.items():
        region = AU_REGIONS[SITE_REGION[site]][0]
        assert len(set(ids) & set(region)) >= len(ids) - 1, site  # the glabella: 2 of 3
        c = site_centre(LM, site)
        assert cv2.pointPolygonTest(face_polygon(LM).astype(np.float32),
                                    (float(c[0]), float(c[1])), False) > 0, site
    # the bilateral sites are mirror images of each other on the symmetric template
    for r, l in (("brow_r", "brow_l"), ("eye_r", "eye_l"), ("cheek_r", "cheek_l"),
                 ("mouth_r", "mouth_l")):
        cr, cl = site_centre(LM, r), site_centre(LM, l)
        assert cr[0] + cl[0] == pytest.approx(2 * 60.0, abs=1.0) and cr[0] < cl[0]
        assert cr[1] == pytest.approx(cl[1], abs=1.0)


def test_a_sticker_larger_than_the_face_is_refused_naming_the_clip():
    big = Sticker(StickerStyle("c"), "nose", 1.5)
    with pytest.raises(StickerError, match=r"synA/sub01/EP01_1.*larger than the face"):
        check_sticker(big, LM, (SIZE, SIZE), "synA/sub01/EP01_1")
    with pytest.raises(StickerError, match=r"synA/sub01/EP01_1.*no area"):
        check_sticker(Sticker(StickerStyle("c"), "nose", 0.0), LM, (SIZE, SIZE),
                      "synA/sub01/EP01_1")


def test_a_sticker_mostly_outside_the_face_is_refused_naming_the_clip():
    # 60% of the face on the chin: most of it hangs below the jaw
    with pytest.raises(StickerError, match=r"clipX.*outside the face.*on the face"):
        check_sticker(Sticker(StickerStyle("c"), "chin", 0.6), LM, (SIZE, SIZE), "clipX")
    # a face half out of the frame: a cheek sticker beyond the frame edge counts as off it
    shifted = LM - [70.0, 0.0]
    with pytest.raises(StickerError, match=r"clipY.*outside the face"):
        check_sticker(Sticker(StickerStyle("c"), "cheek_r", 0.05), shifted, (SIZE, SIZE),
                      "clipY")
    with pytest.raises(StickerError, match=r"clipZ.*landmarks"):
        check_sticker(Sticker(StickerStyle("c"), "nose", 0.05), np.full((68, 2), np.nan),
                      (SIZE, SIZE), "clipZ")
    area, alpha = check_sticker(Sticker(StickerStyle("c"), "nose", 0.05), LM, (SIZE, SIZE), "ok")
    assert area == pytest.approx(0.05 * face_area(LM)) and alpha.sum() == pytest.approx(area,
                                                                                          rel=0.02)


def test_the_sticker_follows_the_face_from_onset_to_apex():
    onset = _texture()
    shift = np.array([1.5, -0.75])
    apex = cv2.warpAffine(onset, np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float64),
                          (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    sticker = Sticker(StickerStyle("s", "star"), "cheek_l", 0.04)
    frames, outlines = sticker_frames([onset, apex], LM, sticker, "clip")
    np.testing.assert_allclose(outlines[1].mean(0) - outlines[0].mean(0), shift, atol=0.15)
    _, still = sticker_frames([onset, apex], LM, sticker, "clip", track=False)
    np.testing.assert_allclose(still[1], still[0])
    # outside the sticker the frame is untouched
    alpha = render_alpha(outlines[0], (SIZE, SIZE))
    assert np.array_equal(frames[0][alpha == 0], onset[alpha == 0])
    assert not np.array_equal(frames[0][alpha > 0.5], onset[alpha > 0.5])


def test_site_motion_finds_the_moving_site_and_removes_head_drift():
    flow = np.zeros((SIZE, SIZE, 2))
    flow[...] = [0.4, -0.2]  # head drift: removed
    c = site_centre(LM, "mouth_l")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    flow[(xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= 12 ** 2] += [0.0, 2.0]
    m = site_motion(flow, LM, disc_fraction=0.02)
    assert list(SITES)[int(np.argmax(m))] == "mouth_l"
    assert m[list(SITES).index("mouth_l")] == pytest.approx(2.0, abs=1e-9)
    assert m[list(SITES).index("brow_r")] == pytest.approx(0.0, abs=1e-9)


def _causal_data(n: int = 300, seed: int = 0):
    """Sites a..e: d drives the prediction; e is a noisy copy of d (correlated, no cause);
    a and b move together; c is noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5))
    z[:, 1] = z[:, 0] + 0.5 * rng.normal(size=n)
    z[:, 4] = z[:, 3] + 0.6 * rng.normal(size=n)
    score = 1.5 * z[:, 3] + 0.5 * rng.normal(size=n)
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3]))
    return np.exp(z), y


@pytest.mark.parametrize("method", ["pc", "fci"])
def test_causal_ranking_picks_the_cause_not_a_correlated_bystander(method):
    x, y = _causal_data()
    r = causal_ranking(x, y, list("abcde"), ["neg", "pos", "sur"], method=method)
    assert r.best == "d" and not r.fallback
    assert r.scores[list("abcde").index("e")] < 0.5 * r.scores[list("abcde").index("d")]
    # e correlates with the prediction almost as much as d: correlation alone is fooled less
    # clearly than the score says, which is the point of conditioning on d
    corr = [abs(np.corrcoef(np.log(x[:, j]), y)[0, 1]) for j in range(5)]
    assert corr[4] > 0.5 and r.scores[4] < 0.1
    assert set(r.causes) == {"neg", "pos", "sur"} and "d" in r.causes["neg"]


def test_causal_ranking_degenerate_inputs():
    x, y = _causal_data(40)
    one = causal_ranking(x, np.zeros(40, int), list("abcde"), ["neg", "pos"])
    assert one.fallback and "one class only" in one.note
    assert one.best == list("abcde")[int(np.argmax(x.mean(0)))]
    with pytest.raises(CausalDiscoveryError, match="at least 5 reference clips"):
        causal_ranking(x[:4], y[:4], list("abcde"), ["a", "b", "c"])
    flat = x.copy()
    flat[:, 2] = 1.0
    with pytest.raises(CausalDiscoveryError, match=r"without variation.*\['c'\]"):
        causal_ranking(flat, y, list("abcde"), ["a", "b", "c"])
    assert causal_ranking(x, y, list("abcde"), ["a", "b", "c"]).depth == 5  # every other site
    small = causal_ranking(x[:7], y[:7], list("abcde"), ["a", "b", "c"])
    assert small.depth == 3 and small.n == 7  # capped at N - 4 conditioning sites


def test_the_black_box_allows_one_query_per_clip_and_attack():
    calls = []

    def predict(x, lm):
        calls.append(len(x))
        return np.arange(len(x)) % 3

    box = BlackBox(predict, budget=1)
    out = box.query("causal", ["a", "b"], np.zeros((2, 3, 4, 4)))
    assert out.tolist() == [0, 1] and box.total == 2
    box.query("random", ["a", "b"], np.zeros((2, 3, 4, 4)))
    with pytest.raises(QueryBudgetError, match=r"'causal'.*clip a"):
        box.query("causal", ["a"], np.zeros((1, 3, 4, 4)))
    with pytest.raises(QueryBudgetError):
        box.query("other", ["c", "c"], np.zeros((2, 3, 4, 4)))
    assert box.total == 4 and box.per_clip_max() == 1 and calls == [2, 2]


def test_style_from_config_refuses_unknown_keys_and_shapes():
    s = StickerStyle.from_dict({"name": "x", "shape": "star", "colour": [1, 2, 3]})
    assert s.colour == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown keys"):
        StickerStyle.from_dict({"name": "x", "size": 3})
    with pytest.raises(ValueError, match="shape 'hexagon'"):
        StickerStyle("x", "hexagon")
    with pytest.raises(ValueError, match="colour"):
        StickerStyle("x", colour=(0, 0, 300))
    assert math.isclose(StickerStyle("w", colour=(255, 255, 255)).grey(), 255)


def test_the_config_check_refuses_a_sticker_area_above_the_face():
    from hydra import compose, initialize_config_dir

    from mer.config_check import ConfigError, check_config
    from mer.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=sticker_audit",
                                           "sticker_audit.areas=[0.05,1.5]",
                                           "sticker_audit.styles.0.shape=hexagon"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    text = str(e.value)
    assert "sticker_audit.areas=" in text and "sticker_audit.styles[0].shape=hexagon" in text
