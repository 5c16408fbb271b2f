"""MFDAN: DropKey, focal loss, flow-driven attention, gradients, and its inputs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from mer.data.inputs import InputError
from mer.data.samples import FlowSamples
from mer.engine.build import build_module
from mer.engine.losses import focal_loss, make_loss, resolve_loss
from mer.models.components.attention import BiasedSelfAttention, drop_keys
from mer.models.mfdan import flow_saliency
from mer.models.registry import create_model

MODEL_CFG = {"name": "mfdan", "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam",
             "kwargs": {"size": "small"}, "loss": {"kind": "focal", "gamma": 2.0}}


# -- focal loss ------------------------------------------------------------------------------


def test_focal_loss_at_gamma_zero_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(32, 5, generator=g) * 3, torch.randint(0, 5, (32,), generator=g)
    torch.testing.assert_close(focal_loss(logits, y, gamma=0.0), F.cross_entropy(logits, y))
    ce = make_loss(resolve_loss({"kind": "focal", "gamma": 0}, None, 5))
    torch.testing.assert_close(ce(logits, y), F.cross_entropy(logits, y))


def test_focal_loss_known_value_and_alpha():
    # two classes, logits (0, ln 3): p = (1/4, 3/4); true class 1 -> p_t = 3/4
    logits, y = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])
    expected = -(0.25 ** 2) * math.log(0.75)
    assert focal_loss(logits, y, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    alpha = torch.tensor([1.0, 0.5])
    assert focal_loss(logits, y, 2.0, alpha).item() == pytest.approx(0.5 * expected, rel=1e-6)
    # well-classified samples weigh less than under cross-entropy
    assert focal_loss(logits, y, 2.0) < F.cross_entropy(logits, y)


def test_loss_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model.loss.kind='hinge'"):
        resolve_loss({"kind": "hinge"}, None, 3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gama'\]"):
        resolve_loss({"kind": "focal", "gama": 2}, None, 3)
    with pytest.raises(ValueError, match="list of 3 class weights"):
        resolve_loss({"kind": "focal", "alpha": [1, 2]}, None, 3)
    balanced = resolve_loss({"kind": "focal", "alpha": "balanced"}, np.array([0, 0, 0, 1]), 3)
    # inverse counts 1/3, 1 over the present classes, mean 1 -> 0.5, 1.5; absent class -> 1
    assert balanced["alpha"] == pytest.approx([0.5, 1.5, 1.0])


# -- DropKey -----------------------------------------------------------------------------------


def test_dropkey_drops_keys_only_in_training():
    torch.manual_seed(0)
    attn = BiasedSelfAttention(dim=16, heads=2, drop_key=0.3)
    plain = BiasedSelfAttention(dim=16, heads=2, drop_key=0.0)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(4, 10, 16)

    attn.train()
    attn(x)
    probs = attn.last_attention
    dropped = probs == 0
    assert 0.2 < dropped.float().mean().item() < 0.4  # ~30% of the (query, key) pairs
    # keys dropped *before* the softmax: each query's kept keys still sum to 1 (not dropout
    # on the probabilities, which leaves rows summing to less)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert not dropped.all(-1).any()

    attn.eval()
    out = attn(x)
    assert (attn.last_attention > 0).all()
    plain.eval()
    torch.testing.assert_close(out, plain(x))


def test_dropkey_never_drops_every_key_of_a_query():
    logits = torch.zeros(2, 3, 5, 4)
    masked = drop_keys(logits, 0.99, torch.Generator().manual_seed(1))
    assert torch.isfinite(masked.softmax(-1)).all()


# -- flow-driven attention -----------------------------------------------------------------------


def _blob_flow(row: int, col: int, grid: int = 7, size: int = 28) -> torch.Tensor:
    """Normalised flow: 0.5 (no motion) everywhere but one patch of the grid, moving."""
    flow = torch.full((1, 3, size, size), 0.5)
    p = size // grid
    flow[0, 0, row * p:(row + 1) * p, col * p:(col + 1) * p] = 1.0
    flow[0, 1, row * p:(row + 1) * p, col * p:(col + 1) * p] = 0.9
    return flow


def test_saliency_is_where_the_flow_moves():
    s = flow_saliency(_blob_flow(2, 5), 7)[0].reshape(7, 7)
    assert s[2, 5] == 1.0 and s.sum() == 1.0
    assert (flow_saliency(torch.full((1, 3, 28, 28), 0.3), 7) == 0).all()  # no motion


def test_flow_driven_attention_follows_the_flow():
    torch.manual_seed(0)
    net = create_model("mfdan", num_classes=3).eval()
    image = torch.rand(1, 1, 28, 28)

    def attended(flow: torch.Tensor) -> list[int]:
        net(flow, image)
        # attention each key receives, averaged over heads and queries, per block
        return [int(a.mean(dim=(0, 1, 2)).argmax()) for a in net.attention_maps()]

    a = attended(_blob_flow(1, 1))
    b = attended(_blob_flow(5, 4))
    assert a == [1 * 7 + 1] * 2 and b == [5 * 7 + 4] * 2  # every level follows the flow
    # without the flow's drive the attention has no reason to go there
    for block in net.blocks:
        block.gamma.data.zero_()
    assert attended(_blob_flow(1, 1)) == attended(_blob_flow(5, 4))


# -- training ----------------------------------------------------------------------------------


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    net = create_model("mfdan", num_classes=3).train()
    for block in net.blocks:  # zero-initialised flow bias: its gradient still flows
        assert torch.count_nonzero(block.flow_bias.weight) == 0
    x, crop = torch.rand(6, 3, 28, 28), torch.rand(6, 1, 28, 28)
    F.cross_entropy(net(x, crop), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    none = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert none == []


def test_published_size_shapes():
    net = create_model("mfdan", num_classes=5, size="published")
    assert net.grid == 14 and len(net.blocks) == 6 and net.input_spec() == {
        "apex_crop": {"size": 112}}
    out = net(torch.rand(1, 3, 28, 28), torch.rand(1, 1, 112, 112))
    assert out.shape == (1, 5)


def _toy(n: int = 6, size: int = 28) -> FlowSamples:
    meta = pd.DataFrame({"database": "db", "subject": [f"s{i % 3}" for i in range(n)],
                         "clip": [f"c{i}" for i in range(n)], "label": [i % 3 for i in range(n)],
                         "row": list(range(2, n + 2))})
    return FlowSamples(np.random.default_rng(0).random((n, 3, size, size), np.float32), meta,
                       ["a", "b", "c"])


def test_a_flow_cache_has_no_face_crops_and_says_which_prepare_makes_them():
    samples = _toy()  # no input_source: flow images only, as read from a flow cache
    samples.provenance = {"source": "flowcache"}
    with pytest.raises(InputError, match=r"data=flowcache holds flow images only.*"
                                         r"python -m mer\.prepare data=<database>"):
        build_module(MODEL_CFG, samples, np.arange(3))


def test_wrong_flow_size_names_the_sample_and_the_fix():
    with pytest.raises(InputError, match=r"db/s0/c0 \(sheet row 2\).*28x28.*3x64x64.*"
                                         r"data\.flow\.out_size=28"):
        build_module(MODEL_CFG, _toy(size=64), np.arange(3))


def test_apex_crop_uses_the_crop_transform_of_mer_prepare(tmp_path):
    """Prepared data: the apex crop is the frame warped by the clip's own transform, kept in
    the prepare cache (here without a detector: the whole frame scaled to the crop)."""
    import cv2

    from mer.data.inputs import InputRequest, InputSource, compute
    from mer.data.preprocess.align import warp
    from mer.data.preprocess.prepared import PrepareParams, prepare_table

    rng = np.random.default_rng(0)
    folder = tmp_path / "s1" / "c1"
    folder.mkdir(parents=True)
    for k in (1, 2, 3):
        cv2.imwrite(str(folder / f"img{k}.png"), rng.integers(0, 255, (48, 64), np.uint8))
    row = {"database": "db", "subject": "s1", "clip": "c1", "onset": 1, "apex": 3, "offset": 3,
           "onset_path": str(folder / "img1.png"), "apex_path": str(folder / "img3.png"),
           "row": 2, "fps": 100.0}
    params = PrepareParams(detector="none", size=32, out_size=16, method="farneback")
    res = prepare_table(pd.DataFrame([row]), params, progress=False)
    assert res.matrix.shape == (1, 2, 3)
    src = InputSource([row], matrices=res.matrix, crop_size=32)
    crop = compute(src, InputRequest("apex_crop", 16))
    apex = cv2.imread(str(folder / "img3.png"), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(warp(apex, res.matrix[0], 32), (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(crop[0, 0] * 255, expected, atol=0.51)
    onset = compute(src, InputRequest("onset_crop", 16))
    assert np.abs(onset - crop).mean() > 0.03  # another frame (area-averaged noise)
