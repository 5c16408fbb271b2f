"""Privacy attacks: gradient inversion recovers a flow from an unprotected update and fails
under DP-SGD and secure aggregation; membership inference loses its edge under DP."""

import numpy as np
import pytest
import torch

from mer.engine.module import MERModule
from mer.models.registry import create_model
from mer.privacy.attacks.inversion import (
    InversionConfig,
    classifier_input,
    client_update,
    infer_label,
    run_inversion,
    synthetic_me_flows,
)
from mer.privacy.attacks.membership import (
    loss_threshold_attack,
    per_sample_losses,
    train_target,
)
from mer.privacy.dp import DPConfig, fix_module


@pytest.fixture(scope="module")
def victim():
    torch.manual_seed(0)
    net = create_model("ststnet", num_classes=3, in_channels=3, dropout=0.0)
    return fix_module(MERModule(net, 3)).net


def test_label_and_features_read_off_a_one_sample_update(victim):
    x, y = synthetic_me_flows(3, seed=2)
    feats = []
    hook = victim.fc.register_forward_hook(lambda m, inp, o: feats.append(inp[0]))
    victim.train()(x)
    hook.remove()
    for i in range(3):
        update = client_update(victim, x[i:i + 1], y[i:i + 1], lr=0.1)
        assert infer_label(victim, update) == int(y[i])
        torch.testing.assert_close(classifier_input(victim, update), feats[0][i],
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_inversion_succeeds_unprotected_and_fails_under_dp_and_secagg(victim):
    x, y = synthetic_me_flows(12, seed=1)
    cfg = InversionConfig(steps=300)
    runs = {p: [run_inversion(victim, x[i:i + 1], y[i:i + 1], p, cfg,
                              others=(x[3 + 2 * i:5 + 2 * i], y[3 + 2 * i:5 + 2 * i]), seed=i)
                for i in range(3)] for p in ("none", "dp", "secagg")}
    mean = {p: np.mean([r["psnr"] for r in rs]) for p, rs in runs.items()}
    random_psnr = np.mean([r["random_psnr"] for r in runs["none"]])
    assert mean["none"] > random_psnr + 5  # recognisably closer than a random image
    assert all(r["label_ok"] for r in runs["none"])
    assert mean["dp"] < random_psnr + 1.5  # DP noise: no better than random
    assert mean["secagg"] < mean["none"] - 2  # the sum of 3 updates hides the target's flow


def test_membership_inference_auc_drops_with_dp():
    x, y = synthetic_me_flows(160, seed=5, noise=0.6)
    members, outsiders = (x[:80], y[:80]), (x[80:], y[80:])
    net, _ = train_target(*members, epochs=80, lr=3e-3, batch_size=16)
    plain = loss_threshold_attack(per_sample_losses(net, *members),
                                  per_sample_losses(net, *outsiders))
    dp = DPConfig(noise_multiplier=1.5, max_grad_norm=1.0, delta=1e-3)
    net_dp, eps = train_target(*members, epochs=20, lr=3e-3, batch_size=16, dp=dp)
    private = loss_threshold_attack(per_sample_losses(net_dp, *members),
                                    per_sample_losses(net_dp, *outsiders))
    assert plain["auc"] > 0.6
    assert private["auc"] < plain["auc"] - 0.05
    assert 0 < eps < 20
    # the measured advantage respects the (epsilon, delta) bound
    assert private["advantage"] <= (np.exp(eps) - 1 + 2e-3) / (np.exp(eps) + 1)


@pytest.mark.slow
def test_inversion_of_synme_flows_beats_its_prior_only_without_secure_aggregation(
        victim, tmp_path):
    """On SynME's flow images (tiny preset), starting from the mean of the clips it does not
    attack (the attacker's public prior): an unprotected one-clip update gives a flow well
    above that prior; the sum of 3 clients' updates gives nothing beyond it."""
    from omegaconf import OmegaConf

    from mer.data.sources import load_samples
    from mer.run import CONFIG_DIR

    data = OmegaConf.merge(OmegaConf.load(f"{CONFIG_DIR}/data/synme.yaml"), {"preset": "tiny"})
    samples = load_samples(data, tmp_path)
    order = np.random.default_rng(42).permutation(len(samples.x))
    x = torch.from_numpy(samples.x[order[:9]])
    y = torch.as_tensor(samples.labels[order[:9]].copy())
    public = torch.from_numpy(samples.x[order[9:]])
    scores = {p: [run_inversion(victim, x[i:i + 1], y[i:i + 1], p, InversionConfig(steps=300),
                                others=(x[3 + 2 * i:5 + 2 * i], y[3 + 2 * i:5 + 2 * i]),
                                seed=i, public=public) for i in range(3)]
              for p in ("none", "secagg")}
    mean = {p: np.mean([r["psnr"] for r in rs]) for p, rs in scores.items()}
    prior = np.mean([r["prior_psnr"] for r in scores["none"]])
    random = np.mean([r["random_psnr"] for r in scores["none"]])
    assert mean["none"] > prior + 3 and mean["none"] > random + 10
    assert mean["secagg"] < prior + 1
