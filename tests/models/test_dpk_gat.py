import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mer.engine.au_module import AUMERModule
from mer.models.components import DualPriorGATConv
from mer.models.dpk_gat import (
    DPKGAT,
    FACE_TEMPLATE_68,
    REGION_LANDMARKS,
    DPKGATOutput,
    au_loss,
    landmark_patches,
)
from mer.models.priors import cooccurrence_counts, data_prior
from mer.models.registry import create_model

# ---------------------------------------------------------------------------------------------
# DualPriorGATConv against a dense computation


def _graph(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    adj = (torch.rand(n, n, generator=g) < 0.4).double()
    adj.fill_diagonal_(1.0)  # adj[i, j] = 1: edge j -> i
    target, source = adj.nonzero(as_tuple=True)
    prior_dense = torch.rand(n, n, generator=g, dtype=torch.float64) * 3
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return adj, torch.stack([source, target]), prior_dense, prior_dense[target, source], x


def _dense(layer, x, adj, prior_dense, m):
    """Masked GAT attention, prior softmax and output, as (N, N, H) / (N, out) dense tensors."""
    heads, c = layer.heads, layer.out_channels
    h = (x @ layer.lin.weight.T).view(-1, heads, c)
    s_src = (h * layer.att_src).sum(-1)
    s_dst = (h * layer.att_dst).sum(-1)
    e = F.leaky_relu(s_dst[:, None, :] + s_src[None, :, :], layer.negative_slope)  # (i, j, H)
    learned = e.masked_fill(adj[..., None] == 0, float("-inf")).softmax(dim=1)
    prior = prior_dense.masked_fill(adj == 0, float("-inf")).softmax(dim=1)[..., None]
    alpha = (1 - m) * learned + m * prior
    out = torch.einsum("ijh,jhc->ihc", alpha, h).reshape(x.shape[0], -1) + layer.bias
    return learned, prior.expand_as(learned), alpha, out


@pytest.mark.parametrize("beta,ratio", [(0.3, 0.0), (0.0, 1.0)])
def test_attention_is_plain_masked_gat_when_beta_r_is_zero(beta, ratio):
    torch.manual_seed(0)
    adj, edge_index, prior_dense, prior, x = _graph()
    layer = DualPriorGATConv(5, 4, heads=2, beta=beta).double()
    layer.prior_ratio = ratio
    _, (_, alpha) = layer(x, edge_index, prior, return_attention_weights=True)
    learned, _, _, _ = _dense(layer, x, adj, prior_dense, 0.0)
    source, target = edge_index
    torch.testing.assert_close(alpha, learned[target, source], rtol=1e-12, atol=1e-12)


def test_attention_is_the_prior_softmax_when_beta_r_is_one():
    torch.manual_seed(0)
    adj, edge_index, prior_dense, prior, x = _graph(seed=1)
    layer = DualPriorGATConv(5, 4, heads=3, beta=0.5).double()
    layer.prior_ratio = 2.0
    _, (_, alpha) = layer(x, edge_index, prior, return_attention_weights=True)
    _, prior_att, _, _ = _dense(layer, x, adj, prior_dense, 1.0)
    source, target = edge_index
    torch.testing.assert_close(alpha, prior_att[target, source], rtol=1e-12, atol=1e-12)
    # the prior matters: a different prior gives different weights
    _, (_, other) = layer(x, edge_index, prior.flip(0), return_attention_weights=True)
    assert not torch.allclose(alpha, other)


def test_mixed_attention_and_output_match_the_dense_computation():
    torch.manual_seed(0)
    adj, edge_index, prior_dense, prior, x = _graph(seed=2)
    layer = DualPriorGATConv(5, 4, heads=2, beta=0.3).double()
    torch.nn.init.normal_(layer.bias)
    layer.prior_ratio = 0.7
    out, (_, alpha) = layer(x, edge_index, prior, return_attention_weights=True)
    _, _, alpha_dense, out_dense = _dense(layer, x, adj, prior_dense, 0.3 * 0.7)
    source, target = edge_index
    torch.testing.assert_close(alpha, alpha_dense[target, source])
    torch.testing.assert_close(out, out_dense)
    sums = torch.zeros(x.shape[0], 2, dtype=alpha.dtype).index_add_(0, target, alpha)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_no_prior_means_a_uniform_prior():
    adj, edge_index, _, _, x = _graph(seed=3)
    layer = DualPriorGATConv(5, 4, beta=1.0).double()
    _, (_, alpha) = layer(x, edge_index, None, return_attention_weights=True)
    degree = adj.sum(1)
    torch.testing.assert_close(alpha[:, 0], 1 / degree[edge_index[1]])


# ---------------------------------------------------------------------------------------------
# DPKGAT


def _batch(b=6, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    au = (torch.rand(b, 12, generator=g) < 0.3).float()
    mask = torch.tensor([True, False] * (b // 2))
    return x, y, au, mask


def test_parameter_count_is_small():
    n = sum(p.numel() for p in DPKGAT().parameters())
    print(f"\nDPKGAT parameters at 28x28: {n:,}")
    assert 50_000 <= n <= 200_000


def test_forward_28_without_landmarks():
    net = create_model("dpk_gat", num_classes=5)
    out = net(torch.rand(4, 3, 28, 28))
    assert isinstance(out, DPKGATOutput)
    assert out.logits.shape == (4, 5)
    assert out.au_logits.shape == out.au_aux_logits.shape == (4, 12)
    assert net.uses_aus is True
    with pytest.raises(ValueError, match="input_size"):
        net(torch.rand(2, 3, 32, 32))


def test_forward_128_with_landmarks_uses_them():
    torch.manual_seed(0)
    net = DPKGAT(input_size=128).eval()
    x = torch.rand(2, 3, 128, 128)
    template = (FACE_TEMPLATE_68 * 128 - 0.5).expand(2, -1, -1)
    out = net(x, template.clone())
    assert out.logits.shape == (2, 3) and out.au_logits.shape == (2, 12)
    torch.testing.assert_close(out.logits, net(x).logits)  # None -> the same template
    moved = template.clone()
    moved[:, 17:27, 1] += 9.0  # brows moved down
    assert not torch.allclose(net(x, moved).au_aux_logits, out.au_aux_logits)
    with pytest.raises(ValueError, match="68, 2"):
        net(x, template[:, :60])


def test_landmark_patches_are_the_pixels_around_each_point():
    x = torch.rand(2, 3, 28, 28)
    points = torch.tensor([[[10.0, 12.0], [3.0, 20.0]], [[25.0, 4.0], [14.0, 14.0]]])
    patches = landmark_patches(x, points, 5)
    assert patches.shape == (2, 2, 3, 5, 5)
    for b in range(2):
        for i in range(2):
            cx, cy = points[b, i].long().tolist()
            torch.testing.assert_close(patches[b, i], x[b, :, cy - 2:cy + 3, cx - 2:cx + 3])
    # half a pixel to the right: the mean of two neighbouring pixels
    half = landmark_patches(x, points + torch.tensor([0.5, 0.0]), 5)
    cx, cy = 10, 12
    expected = (x[0, :, cy - 2:cy + 3, cx - 2:cx + 3] + x[0, :, cy - 2:cy + 3, cx - 1:cx + 4]) / 2
    torch.testing.assert_close(half[0, 0], expected)


def test_template_is_a_plausible_face():
    t = FACE_TEMPLATE_68
    assert t.shape == (68, 2) and t.min() >= 0 and t.max() <= 1
    brows, eyes, nose, mouth = t[17:27, 1].mean(), t[36:48, 1].mean(), t[31:36, 1].mean(), \
        t[48:68, 1].mean()
    assert brows < eyes < nose < mouth  # top to bottom
    assert t[36, 0] < t[39, 0] < t[42, 0] < t[45, 0]  # eye corners left to right
    assert len(set(REGION_LANDMARKS)) == len(REGION_LANDMARKS)


def test_batched_graphs_do_not_mix_samples():
    torch.manual_seed(0)
    net = DPKGAT().eval()
    x = torch.rand(3, 3, 28, 28)
    together = net(x)
    for i in range(3):
        alone = net(x[i:i + 1])
        torch.testing.assert_close(alone.logits, together.logits[i:i + 1], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(alone.au_logits, together.au_logits[i:i + 1], rtol=1e-4,
                                   atol=1e-5)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = DPKGAT()
    x, y, au, mask = _batch()
    out = net(x)
    loss = 0.2 * F.cross_entropy(out.logits, y) + 0.8 * au_loss(out, au, mask)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient for {missing}"
    # the auxiliary AU head trains the landmark encoder too
    net.zero_grad()
    F.binary_cross_entropy_with_logits(net(x).au_aux_logits[mask], au[mask]).backward()
    assert net.patch_cnn[0].weight.grad.any() and net.landmark_embedding.grad.any()


def test_au_loss_ignores_masked_samples():
    torch.manual_seed(0)
    net = DPKGAT().eval()
    x, _, au, mask = _batch()
    out = net(x)
    loss = au_loss(out, au, mask)
    other = au.clone()
    other[~mask] = 1.0 - other[~mask]
    torch.testing.assert_close(au_loss(out, other, mask), loss)
    other[~mask] = float("nan")  # never read
    torch.testing.assert_close(au_loss(out, other, mask), loss)
    changed = au.clone()
    changed[mask] = 1.0 - changed[mask]
    assert not torch.allclose(au_loss(out, changed, mask), loss)
    # by hand: BCE of both heads over the annotated samples
    expected = sum(F.binary_cross_entropy_with_logits(h[mask], au[mask])
                   for h in (out.au_logits, out.au_aux_logits))
    torch.testing.assert_close(loss, expected)


def test_au_loss_without_annotated_samples_is_zero_and_finite():
    net = DPKGAT()
    x, _, au, _ = _batch()
    out = net(x)
    loss = au_loss(out, torch.full_like(au, float("nan")), torch.zeros(len(x), dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_data_prior_changes_the_output_only_when_used():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 28, 28)
    counts = cooccurrence_counts((torch.rand(40, 12) < 0.3).float())
    for use, changes in ((True, True), (False, False)):
        torch.manual_seed(1)
        net = DPKGAT(use_data_prior=use, prior_beta=1.0).eval()
        before = net(x).logits
        net.set_data_prior(data_prior(counts) * 5)
        assert torch.allclose(net(x).logits, before) != changes
    assert "data_prior" in net.state_dict()
    with pytest.raises(ValueError, match="12, 12"):
        net.set_data_prior(torch.zeros(10, 10))


def test_edge_prior_weights_are_rows_of_the_data_prior():
    # edge j -> i carries P[i, j]: node i's attention over its neighbours follows row i
    net = DPKGAT(prior_beta=1.0).eval()
    prior = torch.rand(12, 12)
    net.set_data_prior(prior)
    seen = []
    for level in net.levels:
        level.conv.register_forward_hook(
            lambda m, args, out: seen.append((args[1], args[2])), with_kwargs=False)
    net(torch.rand(2, 3, 28, 28))
    for level, (edge_index, weights) in zip(net.levels, seen):
        e = level.edge_index.shape[1]
        source = level.nodes[edge_index[0] % len(level.nodes)]
        target = level.nodes[edge_index[1] % len(level.nodes)]
        assert len(weights) == 2 * e
        torch.testing.assert_close(weights, prior[target, source])
        assert torch.equal(edge_index[:, e:] - edge_index[:, :e],
                           torch.full((2, e), len(level.nodes)))  # sample 2 offset by n


def test_prior_ratio_reaches_every_graph_layer():
    torch.manual_seed(0)
    net = DPKGAT().eval()
    x = torch.rand(2, 3, 28, 28)
    before = net(x).logits
    net.set_prior_ratio(0.25)
    assert net.prior_ratio == 0.25
    assert all(level.conv.prior_ratio == 0.25 for level in net.levels)
    assert not torch.allclose(net(x).logits, before)


@pytest.mark.parametrize("kwargs,edges", [
    ({}, [6 + 12, 6 + 6, 44 + 12]),  # upper, lower, global (+ self-loops)
    ({"hierarchical": False}, [62 + 12]),
    ({"use_psych_prior": False}, [36, 36, 144]),
    ({"use_psych_prior": False, "hierarchical": False}, [144]),
])
def test_graph_variants(kwargs, edges):
    net = DPKGAT(**kwargs)
    assert [level.edge_index.shape[1] for level in net.levels] == edges
    assert net(torch.rand(2, 3, 28, 28)).logits.shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# AUMERModule


def _loader(n=16, size=28, batch=8, landmarks=False):
    x, y, au, mask = _batch(n, size)
    tensors = [x, y, au, mask]
    if landmarks:
        tensors.append((FACE_TEMPLATE_68 * size - 0.5).expand(n, -1, -1).clone())
    return DataLoader(TensorDataset(*tensors), batch_size=batch)


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kwargs)


def test_au_module_fast_dev_run_trains_and_predicts():
    L.seed_everything(0)
    module = AUMERModule(DPKGAT(), 3, lr=1e-3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, _loader(), _loader())
    assert {"train_loss", "emotion_loss", "au_loss"} <= set(trainer.logged_metrics)
    changed = [not torch.equal(b, p) for b, p in zip(before, module.parameters())]
    assert all(changed), "every parameter should receive a gradient step"
    probs = torch.cat(_trainer().predict(module, _loader()))
    assert probs.shape == (16, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(16))


def test_au_module_with_landmarks_at_128():
    L.seed_everything(0)
    module = AUMERModule(DPKGAT(input_size=128), 3)
    trainer = _trainer(fast_dev_run=True)
    trainer.fit(module, _loader(8, 128, 4, landmarks=True))
    assert torch.isfinite(trainer.logged_metrics["train_loss"])


def test_au_module_loss_weights():
    torch.manual_seed(0)
    net = DPKGAT().eval()
    batch = _batch()
    on = AUMERModule(net, 3, w_emotion=0.2, w_au=0.8)
    total, emotion, au, _ = on.losses(batch)
    torch.testing.assert_close(total, 0.2 * emotion + 0.8 * au)
    assert au > 0
    off = AUMERModule(net, 3, w_au=0.0)
    total, emotion, au, _ = off.losses(batch)
    assert au == 0
    torch.testing.assert_close(total, 0.2 * emotion)
    # plain (x, y) batches: emotion only
    total, emotion, _, _ = on.losses(batch[:2])
    torch.testing.assert_close(total, 0.2 * emotion)


def test_prior_ratio_schedule(tmp_path):
    decay = AUMERModule(DPKGAT(), 3, prior_schedule="decay", prior_ratio0=1.0)
    assert [decay.prior_ratio_at(e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    fixed = AUMERModule(DPKGAT(), 3, prior_schedule="fixed", prior_ratio0=0.3)
    assert fixed.prior_ratio_at(3, 4) == 0.3
    with pytest.raises(ValueError, match="prior_schedule"):
        AUMERModule(DPKGAT(), 3, prior_schedule="cosine")
    # the trainer applies it at each epoch start: the last of 3 epochs runs at r = 1/3
    trainer = _trainer(max_epochs=3, limit_train_batches=1)
    trainer.fit(decay, _loader())
    assert decay.net.prior_ratio == pytest.approx(1 / 3)
    assert all(level.conv.prior_ratio == pytest.approx(1 / 3) for level in decay.net.levels)
    # checkpoints keep the ratio the weights were trained with
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = AUMERModule(DPKGAT(), 3)
    fresh.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=False))
    assert fresh.net.prior_ratio == pytest.approx(1 / 3)
