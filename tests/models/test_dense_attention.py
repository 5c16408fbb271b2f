"""Dense connections + mixed attention: the dense concatenation, each half of the mixed
attention, gradients, sizes, and its magnified input."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F

from mer.data.inputs import InputRequest, InputSource, compute
from mer.models.components.attention import MixedAttention
from mer.models.dense_attention import DenseBlock
from mer.models.registry import create_model
from mer.run import CONFIG_DIR


def test_dense_block_concatenates_the_input_and_every_layer():
    torch.manual_seed(0)
    block = DenseBlock(in_ch=5, n_layers=3, growth=4).eval()
    x = torch.randn(2, 5, 8, 8)
    out = block(x)
    assert out.shape == (2, 5 + 3 * 4, 8, 8) and block.out_channels == 17
    torch.testing.assert_close(out[:, :5], x)  # the input is carried through unchanged
    # layer i sees the input and the i earlier layers' outputs
    assert [layer.body[2].in_channels for layer in block.layers] == [5, 9, 13]
    torch.testing.assert_close(out[:, 5:9], block.layers[0](x))
    torch.testing.assert_close(out[:, 9:13], block.layers[1](out[:, :9]))


def test_mixed_attention_channel_and_spatial_parts_each_change_the_output():
    torch.manual_seed(0)
    full = MixedAttention(16, reduction=4)
    x = torch.randn(3, 16, 7, 7)
    variants = {}
    for channel, spatial in ((True, True), (False, True), (True, False), (False, False)):
        full.use_channel, full.use_spatial = channel, spatial
        variants[channel, spatial] = full(x)
    torch.testing.assert_close(variants[False, False], x)
    for a in variants:
        for b in variants:
            if a != b:
                assert (variants[a] - variants[b]).abs().max() > 1e-3, (a, b)
    # the channel gate is one value per channel, the spatial gate one per position
    gc, gs = full.channel_gate(x), full.spatial_gate(x)
    assert gc.shape == (3, 16, 1, 1) and gs.shape == (3, 1, 7, 7)
    assert ((gc > 0) & (gc < 1)).all() and ((gs > 0) & (gs < 1)).all()
    full.use_channel, full.use_spatial = True, True
    torch.testing.assert_close(full(x), x * gc * full.spatial_gate(x * gc))


def test_the_model_switches_pass_to_every_mixed_attention():
    net = create_model("dense_attention", num_classes=3, channel_attention=False)
    gates = [m for m in net.modules() if isinstance(m, MixedAttention)]
    assert len(gates) == 2 and all(not g.use_channel and g.use_spatial for g in gates)


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    net = create_model("dense_attention", num_classes=3).train()
    mag = torch.rand(6, 3, 28, 28)
    F.cross_entropy(net(torch.rand(6, 3, 28, 28), mag), torch.tensor([0, 1, 2] * 2)).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()] \
        == []


def test_the_plain_flow_is_not_used():
    net = create_model("dense_attention", num_classes=3).eval()
    mag = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(net(torch.rand(2, 3, 28, 28), mag), net(torch.zeros(2, 3, 28, 28),
                                                                       mag))


@pytest.mark.parametrize("size, blocks, features", [("small", 2, 66), ("published", 4, 1024)])
def test_sizes(size, blocks, features):
    net = create_model("dense_attention", num_classes=4, size=size).eval()
    assert sum(isinstance(m, DenseBlock) for m in net.modules()) == blocks
    # small: 24 + 3 * 12 = 60 -> 30 -> 30 + 3 * 12 = 66; published: DenseNet-121's 1024
    assert net.feature_dim == features
    with torch.no_grad():
        assert net(None, torch.rand(1, 3, 28, 28)).shape == (1, 4)


def _clip(tmp_path, n_frames: int, moving: bool = True):
    """A clip on disk: a dark square that moves right by 1 px per frame (or not at all)."""
    import cv2

    folder = tmp_path / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_frames):
        img = np.full((64, 64), 200, np.uint8)
        shift = k if moving else 0
        img[20:40, 20 + shift:40 + shift] = 40
        cv2.imwrite(str(folder / f"img{k + 1}.png"), img)
    return {"database": "db", "subject": "s1", "clip": "c1", "onset": 1, "apex": n_frames,
            "offset": n_frames, "onset_path": str(folder / "img1.png"), "fps": 30.0, "row": 4}


def test_magnified_inputs_are_the_plain_ones_at_alpha_zero_and_differ_above(tmp_path):
    import cv2

    from mer.data.inputs import _flow_image

    row = _clip(tmp_path, 6)
    base = {"flow": {"method": "farneback", "work_size": 64}, "cache_dir": None}
    band = {"low_hz": 0.5, "high_hz": 14.0, "levels": 3, "skip_levels": 0}
    req = InputRequest("magnified_flow", 28)
    soft = compute(InputSource([row], magnify={"alpha": 0.0, **band}, **base), req)
    loud = compute(InputSource([row], magnify={"alpha": 6.0, **band}, **base), req)
    assert soft.shape == (1, 3, 28, 28) and np.isfinite(loud).all()
    # alpha = 0 leaves the clip as it is: the flow of the plain onset and apex frames
    a, b = (cv2.resize(cv2.imread(str(tmp_path / f"clip/img{k}.png"), 0), (64, 64))
            for k in (1, 6))
    plain = _flow_image(a.astype(np.float32), b.astype(np.float32), 28, InputSource([row], **base),
                        "s")
    np.testing.assert_allclose(soft[0], plain, atol=0.02)
    assert np.abs(loud - soft).max() > 0.05
    frames = compute(InputSource([row], **base), InputRequest("frames", 32, length=6))
    same = compute(InputSource([row], magnify={"alpha": 0.0, **band}, **base),
                   InputRequest("magnified_frames", 32, length=6))
    boosted = compute(InputSource([row], magnify={"alpha": 6.0, **band}, **base),
                      InputRequest("magnified_frames", 32, length=6))
    np.testing.assert_allclose(same, frames, atol=2 / 255)
    assert np.abs(boosted - frames).max() > 0.1


def test_data_magnify_without_the_full_pipeline_is_refused_not_ignored(tmp_path):
    """data.magnify.enabled=true is a step of mer.prepare's pipeline; the plain flow path used
    to compute unmagnified flow without a word."""
    from pathlib import Path

    from mer.data.sources import DataConfigError, load_samples

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data.preset=tiny", "data.workers=0",
                                           "data.magnify.enabled=true", "data.prepared=false"])
    cache = Path.home() / ".cache" / "mer"  # SynME tiny there already: no generation if wrong
    with pytest.raises(DataConfigError, match=r"data\.magnify\.enabled=true.*python -m "
                                              r"mer\.prepare.*data\.prepared=true"):
        load_samples(cfg.data, cache)
