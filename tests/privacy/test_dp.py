"""DP-SGD inside Lightning (Opacus) and central DP at the server: accounting against Opacus'
own analysis, per-sample clipping against a direct computation, refusals, flwr's clipping."""

import logging
import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant
from torch import nn

from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.module import MERModule
from mer.models.registry import create_model
from mer.privacy.base import flatten
from mer.privacy.dp import (
    CentralDP,
    CentralDPConfig,
    ClientPrivacy,
    DPConfig,
    DPUnsupportedModel,
    clip_update,
    fix_module,
    make_private,
    noise_for_budget,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def flow_samples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"database": "db", "subject": f"s{i % 5}", "clip": f"c{i}", "label": i % 3}
            for i in range(n)]
    return FlowSamples(rng.standard_normal((n, 3, 28, 28)).astype(np.float32),
                       pd.DataFrame(rows), ["a", "b", "c"])


def ststnet_module(optimizer="adam", lr=1e-3, dropout=0.5, seed=0):
    torch.manual_seed(seed)
    net = create_model("ststnet", num_classes=3, in_channels=3, dropout=dropout)
    return MERModule(net, 3, lr=lr, optimizer=optimizer)


def fit(module, dm, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, limit_val_batches=0, **kwargs)
        trainer.fit(module, datamodule=dm)


def independent_epsilon(history, delta):
    """Epsilon of a (sigma, q, steps) history straight from Opacus' RDP analysis."""
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=alphas)
              for s, q, k in history)
    return rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)[0]


def test_epsilon_grows_with_rounds_and_equals_opacus_analysis():
    samples = flow_samples(n=40)
    dp = DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-3)
    privacy = ClientPrivacy("lab0", dp)
    weights, eps = None, [privacy.epsilon()]
    for rnd in range(3):  # three federated rounds of one local epoch
        module = fix_module(ststnet_module(seed=rnd))
        if weights is not None:
            module.net.load_state_dict(weights)
        dm = SplitDataModule(samples, np.arange(40), np.arange(5), batch_size=10)
        module, dp_dm = make_private(module, dm, dp, privacy, seed=rnd)
        fit(module, dp_dm, max_epochs=1)
        weights = module.net.state_dict()
        eps.append(privacy.epsilon())
        # q = 1 / round(40 / 10) = 0.25: four Poisson steps an epoch, all accounted
        assert privacy.steps == 4 * (rnd + 1)
        assert eps[-1] == pytest.approx(
            independent_epsilon([(1.1, 0.25, privacy.steps)], 1e-3), rel=1e-9)
    assert eps[0] == 0 < eps[1] < eps[2] < eps[3]
    assert not hasattr(next(module.net.parameters()), "grad_sample")  # hooks cleaned up


@pytest.mark.parametrize("per_sample", ["hooks", "loop"])
def test_per_sample_clipping_matches_a_direct_computation(per_sample, monkeypatch):
    """Noise 0, q = 1 (every sample in every batch), one SGD step: the update must be
    -lr * mean_i clip_C(g_i) with each per-sample gradient g_i clipped on its own; with
    Opacus' hooks and with the per-sample backward loop (used where hooks cannot go)."""
    if per_sample == "loop":
        monkeypatch.setattr("mer.privacy.dp.hooks_supported", lambda net: False)
    samples = flow_samples(n=12, seed=1)
    module = fix_module(ststnet_module(optimizer="sgd", lr=1.0, dropout=0.0))
    net = module.net
    before = {k: v.clone() for k, v in net.named_parameters()}
    x = torch.from_numpy(samples.x)
    y = torch.as_tensor(samples.labels.copy())
    params = dict(net.named_parameters())

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in params.items()}, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    clip = 0.05
    assert (norms > clip).all()  # clipping is active for every sample
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: -(g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / 12
                for k, g in grads.items()}
    clipped_norms = norms * factor
    assert (clipped_norms <= clip + 1e-6).all()

    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0)
    dm = SplitDataModule(samples, np.arange(12), np.arange(2), batch_size=12)
    module, dp_dm = make_private(module, dm, dp, ClientPrivacy("lab0", dp))
    fit(module, dp_dm, max_steps=1)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.detach() - before[k], expected[k], rtol=1e-4, atol=1e-6)
    # the batch gradient clipped as a whole would be a different step
    total = torch.sqrt(sum((p.detach() - before[k]).pow(2).sum()
                           for k, p in net.named_parameters()))
    assert total <= clip + 1e-6


def test_batch_norm_is_refused_then_converted():
    samples = flow_samples(n=8)
    dm = SplitDataModule(samples, np.arange(8), np.arange(2), batch_size=4)
    dp = DPConfig()
    with pytest.raises(DPUnsupportedModel, match="fix_module"):
        make_private(ststnet_module(), dm, dp, ClientPrivacy("lab0", dp))
    module = fix_module(ststnet_module())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.net.modules())
    assert not any(k.endswith("running_mean") for k in module.net.state_dict())
    make_private(module, dm, dp, ClientPrivacy("lab0", dp))


def test_dpk_gat_trains_under_dp_sgd_with_per_sample_backward_passes():
    """Opacus' hooks cannot take DPK-GAT (graph layers batch over nodes), so its per-sample
    gradients come from one backward pass each; the accountant counts the steps."""
    from mer.engine.build import build_module
    from mer.privacy.dp import hooks_supported

    samples = flow_samples(n=8)
    samples.meta["aus"] = [(4,), (12,), (1, 2), (), (6, 12), (4, 7), (12,), (2,)]
    model = {"name": "dpk_gat", "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam",
             "kwargs": {}, "loss": {"w_emotion": 0.2, "w_au": 0.8},
             "prior": {"schedule": "fixed", "ratio": 0.3}}
    module = fix_module(build_module(model, samples, np.arange(8)))
    assert not hooks_supported(module.net)
    before = [p.detach().clone() for p in module.net.parameters()]
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    privacy = ClientPrivacy("lab0", dp)
    dm = SplitDataModule(samples, np.arange(8), np.arange(2), batch_size=4, with_aus=True)
    module, dp_dm = make_private(module, dm, dp, privacy, seed=1)
    fit(module, dp_dm, max_epochs=1)
    assert privacy.steps == 2 and privacy.epsilon() > 0
    after = list(module.net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_noise_for_a_target_epsilon_spends_it():
    dp = DPConfig(target_epsilon=4.0, delta=1e-4)
    sigma = noise_for_budget(dp, sample_rate=0.1, steps=200)
    eps = independent_epsilon([(sigma, 0.1, 200)], 1e-4)
    assert 3.9 < eps <= 4.0


def test_central_dp_clipping_equals_flwr():
    from flwr.supercore.differential_privacy import compute_clip_model_update

    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5)]
    w = [a + rng.standard_normal(a.shape).astype(a.dtype) for a in ref]
    mine, norm = clip_update(w, ref, clip_norm=0.5)
    theirs = [a.copy() for a in w]
    compute_clip_model_update(theirs, ref, 0.5)
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(flatten(mine) - flatten(ref)) == pytest.approx(0.5, rel=1e-6)
    assert norm > 0.5
    small = [a + 1e-3 for a in ref]  # inside the ball: unchanged
    np.testing.assert_allclose(flatten(clip_update(small, ref, 0.5)[0]), flatten(small))


def test_central_dp_noise_and_epsilon():
    cfg = CentralDPConfig(noise_multiplier=0.8, clip_norm=2.0, delta=1e-3)
    central = CentralDP(cfg, num_clients=10, seed=0)
    glob = [np.zeros(200_000)]
    results = [([np.full(200_000, 1.0)], 7) for _ in range(5)]  # norm 447 -> clipped to 2
    out = central.aggregate(glob, results)
    clipped_mean = 2.0 / np.sqrt(200_000)  # every client's update, clipped, averaged
    noise = out[0] - clipped_mean
    assert noise.mean() == pytest.approx(0.0, abs=1e-3)
    assert noise.std() == pytest.approx(0.8 * 2.0 / 5, rel=0.01)  # sigma * C / K
    eps = [central.epsilon()]
    for _ in range(3):
        central.aggregate(glob, results)
        eps.append(central.epsilon())
    assert eps[0] < eps[1] < eps[2] < eps[3]
    assert eps[-1] == pytest.approx(independent_epsilon([(0.8, 0.5, 4)], 1e-3), rel=1e-9)
