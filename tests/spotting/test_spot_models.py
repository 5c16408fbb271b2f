"""Each spotter network's distinctive mechanism: ME-TST's state-space recurrence and shared
features, MESFusion's fusion units and both modalities reaching the output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer.spotting.me_tst import METSTModule, METSTNet
from mer.spotting.mesfusion import CSAFU, MFEM, SCAFU, MESFusionNet

torch.set_num_threads(1)


# -- ME-TST ------------------------------------------------------------------------------------


def reference_scan(x, delta, a, b, c, d):
    """The selective scan written as its recurrence, one time step and one channel at a time:
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t;  y_t = C_t . h_t + D x_t."""
    batch, length, channels = x.shape
    y = np.zeros((batch, length, channels))
    for bi in range(batch):
        for ch in range(channels):
            h = np.zeros(a.shape[1])
            for t in range(length):
                dt = delta[bi, t, ch]
                h = np.exp(dt * a[ch]) * h + dt * b[bi, t] * x[bi, t, ch]
                y[bi, t, ch] = c[bi, t] @ h + d[ch] * x[bi, t, ch]
    return y


def test_selective_scan_matches_step_by_step_recurrence():
    torch.manual_seed(0)
    net = METSTNet(in_features=5, d_model=4, n_layers=1, d_state=3)
    block = net.forward_ssm.layers[0].mixer
    batch, length, ed, n = 2, 11, block.config.d_inner, 3   # length not a power of 2: padded
    x = torch.randn(batch, length, ed, dtype=torch.float64)
    delta = torch.rand(batch, length, ed, dtype=torch.float64) * 0.5
    a = -torch.rand(ed, n, dtype=torch.float64) - 0.1
    b = torch.randn(batch, length, n, dtype=torch.float64)
    c = torch.randn(batch, length, n, dtype=torch.float64)
    d = torch.randn(ed, dtype=torch.float64)
    parallel = block.selective_scan(x, delta, a, b, c, d)        # mambapy's parallel scan
    expected = reference_scan(*(t.numpy() for t in (x, delta, a, b, c, d)))
    np.testing.assert_allclose(parallel.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_trunk_equals_its_step_by_step_inference():
    """The trunk's forward pass (parallel scan over the sequence) equals feeding the frames
    one at a time through the recurrent state (mambapy's step with its cache)."""
    torch.manual_seed(1)
    net = METSTNet(in_features=5, d_model=8, n_layers=2, d_state=4).eval()
    x = torch.randn(1, 13, 5)
    with torch.no_grad():
        h = net.embed(x)
        full = net.forward_ssm(h)
        cfg = net.forward_ssm.config
        caches = [(torch.zeros(1, cfg.d_inner, cfg.d_state),
                   torch.zeros(1, cfg.d_inner, cfg.d_conv - 1)) for _ in range(cfg.n_layers)]
        steps = []
        for t in range(h.shape[1]):
            out, caches = net.forward_ssm.step(h[:, t], caches)
            steps.append(out)
    torch.testing.assert_close(full[0], torch.stack(steps, 1)[0], rtol=1e-4, atol=1e-5)


def test_reversed_scan_sees_the_future():
    torch.manual_seed(2)
    net = METSTNet(in_features=3, d_model=8, n_layers=1, d_state=4).eval()
    x = torch.randn(1, 16, 3)
    y = x.clone()
    y[0, 12] += 5.0  # change a late frame only
    with torch.no_grad():
        fa, fb = net.features(x), net.features(y)
    d = 8
    # the forward half of frame 3 cannot know frame 12; the backward half does
    assert torch.allclose(fa[0, 3, :d], fb[0, 3, :d])
    assert not torch.allclose(fa[0, 3, d:], fb[0, 3, d:])


def test_recognition_loss_reaches_the_shared_trunk():
    torch.manual_seed(3)
    net = METSTNet(in_features=5, d_model=8, n_layers=1, d_state=4, num_classes=3)
    module = METSTModule(net, torch.ones(3), w_spot=0.0, w_rec=1.0)  # recognition only
    batch = {"x": torch.randn(2, 16, 5), "y": torch.zeros(2, 16, 2), "mask": torch.ones(2, 16),
             "spans": torch.tensor([[[2, 6], [-1, -1]], [[0, 15], [8, 9]]]),
             "labels": torch.tensor([[1, -1], [0, 2]])}
    module.compute_loss(batch).backward()

    def grad_norm(m):
        return sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)

    assert grad_norm(net.embed) > 0 and grad_norm(net.forward_ssm) > 0 \
        and grad_norm(net.backward_ssm) > 0
    assert grad_norm(net.rec_head) > 0
    assert grad_norm(net.spot_head) == 0  # the spotting head is not on this path
    # and the spotting loss reaches the same trunk parameters
    net.zero_grad()
    METSTModule(net, torch.ones(3), w_spot=1.0, w_rec=0.0).compute_loss(
        {**batch, "y": torch.rand(2, 16, 2)}).backward()
    assert grad_norm(net.embed) > 0 and grad_norm(net.rec_head) == 0


def test_recognition_pools_only_inside_the_span():
    torch.manual_seed(4)
    net = METSTNet(in_features=2, d_model=4, n_layers=1, d_state=2, num_classes=2).eval()
    feats = torch.randn(1, 10, 8)
    changed = feats.clone()
    changed[0, 7:] += 3.0  # outside span [1, 5]
    spans = torch.tensor([[[1, 5]]])
    torch.testing.assert_close(net.recognise(feats, spans), net.recognise(changed, spans))


# -- MESFusion ----------------------------------------------------------------------------------


def test_fusion_units_shapes():
    c, h, w = 8, 4, 4
    r, f, g = (torch.randn(3, c, h, w) for _ in range(3))
    assert MFEM(c)(r, f).shape == (3, c, h, w)
    assert SCAFU(c)(r, f, g).shape == (3, c, h, w)
    assert CSAFU(c)(g, r, f).shape == (3, c, h, w)
    net = MESFusionNet(image_size=32, channels=8, levels=2, window=6)
    batch = {"rgb": torch.randint(0, 255, (2, 6, 1, 32, 32), dtype=torch.uint8),
             "flow": torch.randn(2, 6, 2, 32, 32).half()}
    out = net(batch)
    assert out.shape == (2, 6, 2) and bool(((out > 0) & (out < 1)).all())
    assert net.frame_embeddings(torch.rand(5, 1, 32, 32), torch.randn(5, 2, 32, 32)).shape == \
        (5, 16)


@pytest.mark.parametrize("modality", ["rgb", "flow"])
def test_each_modality_reaches_the_output(modality):
    torch.manual_seed(5)
    net = MESFusionNet(image_size=32, channels=8, levels=2, window=4).eval()
    rgb = torch.rand(1, 4, 1, 32, 32, requires_grad=True)
    flow = torch.randn(1, 4, 2, 32, 32, requires_grad=True)
    b, w = rgb.shape[:2]
    e = net.frame_embeddings(rgb.flatten(0, 1), flow.flatten(0, 1)).reshape(b, w, -1)
    net.head(net.temporal(e + net.pos[:, :w])).sum().backward()
    grad = (rgb if modality == "rgb" else flow).grad
    assert grad is not None and float(grad.abs().sum()) > 0
    # and through each fusion unit: zeroing the modality changes the fused output
    r, f = net.rgb_stem(rgb.flatten(0, 1)), net.flow_stem(flow.flatten(0, 1))
    g = net.mfem(r, f)
    fused = net.scafu[0](r, f, g)
    if modality == "rgb":
        other = net.scafu[0](torch.zeros_like(r), f, g)
    else:
        other = net.scafu[0](r, torch.zeros_like(f), g)
    assert not torch.allclose(fused, other)
    base = net.csafu[0](fused, r, f)
    alt = net.csafu[0](fused, torch.zeros_like(r), f) if modality == "rgb" else \
        net.csafu[0](fused, r, torch.zeros_like(f))
    assert not torch.allclose(base, alt)


def test_flow_amplitude_survives_the_flow_path():
    """Motion strength is the spotting signal: a faint flow (noise-level motion) must embed near
    no motion at all, not near the same pattern at full strength. A per-frame normalisation
    (GroupNorm over a whole frame) in the flow stem and MFEM made them scale-invariant (exactly
    so with zero biases): every faint flicker looked like an expression, the micro false
    positives of #16. Biases are zeroed so that only the normalisation decides."""
    torch.manual_seed(0)
    net = MESFusionNet(image_size=32, channels=8, levels=2, window=4).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    pattern = torch.zeros(1, 2, 32, 32)
    pattern[:, 0, 8:14, 6:26] = 1.0     # a brow-like patch moving sideways
    flow = torch.cat([pattern, 0.02 * pattern, torch.zeros_like(pattern)])
    rgb = torch.rand(1, 1, 32, 32).expand(3, 1, 32, 32)
    with torch.no_grad():
        strong, faint, still = net.flow_stem(flow)
        assert float((faint - still).norm()) < 0.1 * float((faint - strong).norm())
        r = net.rgb_stem(rgb)
        g_strong, g_faint, g_still = net.mfem(r, net.flow_stem(flow))
        assert float((g_faint - g_still).norm()) < 0.1 * float((g_faint - g_strong).norm())


def test_frame_vector_keeps_where_on_the_face_the_motion_is():
    """The same motion on the brows or on the mouth must give different frame vectors: the
    fused maps are read out per face quadrant (2 x 2), not averaged over the whole face (a
    whole-face mean of translation-equivariant features barely tells them apart: ratio ~0.1)."""
    torch.manual_seed(0)
    net = MESFusionNet(image_size=32, channels=8, levels=2, window=4).eval()
    rgb = torch.full((3, 1, 32, 32), 0.5)
    upper, lower = torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32)
    upper[:, 0, 4:10, 8:24] = 1.0
    lower[:, 0, 20:26, 8:24] = 1.0
    with torch.no_grad():
        a, b, still = net.frame_embeddings(rgb, torch.cat([upper, lower, torch.zeros_like(upper)]))
    assert float((a - b).norm()) > 0.3 * float((a - still).norm())
