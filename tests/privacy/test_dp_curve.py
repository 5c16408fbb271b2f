"""DP at a usable operating point: the frozen extractor stays frozen under every DP path,
Poisson DP-SGD is accounted as Opacus' own analysis accounts it, noise calibration hits its
target, and ``+experiment=dp_curve`` runs end to end on tiny SynME."""

import json
import logging
import math
import warnings

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.module import MERModule
from mer.experiments.dp_curve import (
    DPCurveConfigError,
    _padded,
    _sgd,
    check_disjoint,
    deal_sites,
    local_gd,
    public_data_config,
    run_dp_curve,
)
from mer.models.frozen_head import FrozenHead
from mer.models.registry import create_model
from mer.privacy.dp import (
    CentralDP,
    CentralDPConfig,
    ClientPrivacy,
    DPConfig,
    calibrate_noise,
    dp_sgd,
    fix_module,
    make_private,
)
from mer.run import CONFIG_DIR

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, 28, 28), generator=g), torch.arange(n) % 3


def frozen_snapshot(net: FrozenHead) -> dict:
    return {**{k: v.clone() for k, v in net.extractor.state_dict().items()},
            "mean": net.feature_mean.clone(), "std": net.feature_std.clone()}


def assert_bit_identical(before: dict, net: FrozenHead) -> None:
    after = frozen_snapshot(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"frozen extractor entry {k} changed"


def independent_epsilon(history, delta):
    """Epsilon of a (sigma, q, steps) history straight from Opacus' RDP analysis."""
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=k, orders=alphas)
              for s, q, k in history)
    return rdp_analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)[0]


# ---- the frozen extractor -----------------------------------------------------------------


def test_only_the_head_is_trainable_shared_and_noised():
    net = create_model("frozen_head", num_classes=3, in_channels=3, feature_dim=16)
    assert list(net.state_dict()) == ["head.weight", "head.bias"]
    assert [n for n, _ in net.named_parameters()] == ["head.weight", "head.bias"]
    x, y = images()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for p in net.extractor.parameters())
    assert not any(p.requires_grad for p in net.extractor.parameters())
    net.train()
    assert not net.extractor.training  # dropout off, batch norm on stored statistics
    torch.testing.assert_close(net(x), net.head(net.features(x)), rtol=0, atol=0)


def test_dp_sgd_leaves_the_extractor_bit_identical_and_noises_the_head_only():
    torch.manual_seed(0)
    net = FrozenHead(num_classes=3, in_channels=3, feature_dim=16,
                     backbone_kwargs={"dropout": 0.5})
    before, head0 = frozen_snapshot(net), net.head.weight.clone()
    x, y = images(40)
    privacy = ClientPrivacy("lab", DPConfig(), noise_multiplier=2.0)
    stats = dp_sgd(net, x, y, privacy, steps=12, sample_rate=0.25, max_grad_norm=1.0, lr=0.1)
    assert_bit_identical(before, net)
    assert not torch.equal(head0, net.head.weight)
    assert all(p.grad is None and not hasattr(p, "grad_sample")
               for p in net.extractor.parameters())
    # the noise is sigma * C * N(0, I_D) over the head's D = 16 * 3 + 3 = 51 parameters only
    # (its norm is about sigma C sqrt(D) = 14.3; the extractor would add ~1.7k dimensions)
    assert stats["noise_norm"] == pytest.approx(2.0 * math.sqrt(51), rel=0.1)


def test_lightning_dp_sgd_and_central_dp_leave_the_extractor_bit_identical():
    torch.manual_seed(0)
    module = fix_module(MERModule(FrozenHead(3, 3, feature_dim=8), 3, lr=0.1, optimizer="sgd"))
    before = frozen_snapshot(module.net)
    x, y = images(30)
    samples = FlowSamples(x.numpy(), pd.DataFrame(
        {"database": "db", "subject": [f"s{i % 5}" for i in range(30)],
         "clip": [f"c{i}" for i in range(30)], "label": y.numpy()}), ["a", "b", "c"])
    dm = SplitDataModule(samples, np.arange(30), np.arange(5), batch_size=10)
    privacy = ClientPrivacy("lab", DPConfig(noise_multiplier=1.0))
    module, dp_dm = make_private(module, dm, DPConfig(noise_multiplier=1.0), privacy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False,
                  limit_val_batches=0).fit(module, datamodule=dp_dm)
    assert privacy.steps == 6 and privacy.epsilon() > 0
    assert_bit_identical(before, module.net)
    # central DP clips and noises what a client sends: the state dict, i.e. the head only
    weights = [v.numpy() for v in module.net.state_dict().values()]
    noisy = CentralDP(CentralDPConfig(noise_multiplier=1.0), num_clients=3).aggregate(
        weights, [(weights, 10)] * 3)
    assert [w.shape for w in noisy] == [(3, 8), (3,)]
    assert_bit_identical(before, module.net)


# ---- Poisson sampling, accounting, calibration ----------------------------------------------


def test_poisson_batches_have_q_below_one_and_epsilon_equals_opacus_analysis():
    net = torch.nn.Linear(6, 3)
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    privacy = ClientPrivacy("lab", DPConfig(delta=1e-5), noise_multiplier=1.3)
    stats = dp_sgd(net, x, y, privacy, steps=60, sample_rate=0.25, max_grad_norm=1.0, lr=0.1)
    sizes = stats["batch_sizes"]
    assert stats["steps"] == len(sizes) == 60 and stats["sample_rate"] == 0.25
    assert len(set(sizes)) > 3 and max(sizes) < 40  # Poisson: varying, never the whole set
    assert np.mean(sizes) == pytest.approx(10, abs=1.5)
    assert privacy.accountant.history == [(1.3, 0.25, 60)]
    assert privacy.epsilon(1e-5) == pytest.approx(independent_epsilon([(1.3, 0.25, 60)], 1e-5),
                                                  rel=1e-9)
    # the accountant carries on across calls (one holder, several rounds)
    dp_sgd(net, x, y, privacy, steps=20, sample_rate=0.25, max_grad_norm=1.0, lr=0.1)
    assert privacy.epsilon(1e-5) == pytest.approx(independent_epsilon([(1.3, 0.25, 80)], 1e-5),
                                                  rel=1e-9)


@pytest.mark.parametrize("target, q, steps", [(1.0, 0.1, 300), (10.0, 0.05, 200),
                                              (50.0, 1.0, 30)])
def test_noise_calibration_hits_the_target_epsilon(target, q, steps):
    sigma = calibrate_noise(target, 1e-5, q, steps)
    achieved = independent_epsilon([(sigma, q, steps)], 1e-5)
    assert target - 0.05 < achieved <= target + 1e-9


def test_calibrated_training_spends_its_target():
    n, q, steps = 50, 0.2, 25
    x, y = torch.randn(n, 4), torch.arange(n) % 3
    sigma = calibrate_noise(5.0, 1e-5, q, steps)
    privacy = ClientPrivacy("lab", DPConfig(delta=1e-5), noise_multiplier=sigma)
    dp_sgd(torch.nn.Linear(4, 3), x, y, privacy, steps=steps, sample_rate=q,
           max_grad_norm=1.0, lr=0.1)
    assert 4.95 < privacy.epsilon() <= 5.0 + 1e-9
    # central DP across sites: one step per round at q = 1
    sigma = calibrate_noise(5.0, 1e-5, 1.0, 10)
    central = CentralDP(CentralDPConfig(noise_multiplier=sigma, delta=1e-5), num_clients=20)
    w = [np.zeros((3, 4), np.float32)]
    for _ in range(10):
        central.aggregate(w, [(w, 1)] * 20)
    assert 4.95 < central.epsilon() <= 5.0 + 1e-9


def test_calibration_and_dp_sgd_refuse_bad_input_by_name():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(0.0, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, 1e-5, 1.5, 10)
    privacy = ClientPrivacy("lab", DPConfig(), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        dp_sgd(torch.nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
               privacy, steps=1, sample_rate=0.0, max_grad_norm=1.0, lr=0.1)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        dp_sgd(frozen, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), privacy, steps=1,
               sample_rate=0.5, max_grad_norm=1.0, lr=0.1)


# ---- the experiment -------------------------------------------------------------------------


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["+experiment=dp_curve", *overrides])


def test_sites_are_subject_disjoint_and_refuse_more_sites_than_subjects():
    meta = pd.DataFrame({"database": "db", "subject": [f"s{i // 3}" for i in range(30)],
                         "clip": [f"c{i}" for i in range(30)], "label": 0})
    samples = FlowSamples(np.zeros((30, 3, 2, 2), np.float32), meta, ["a"])
    train = np.arange(24)  # subjects s0..s7
    sites = deal_sites(samples, train, 5, seed=0)
    assert sorted(np.concatenate(sites).tolist()) == train.tolist()
    owners = [set(meta.subject[s]) for s in sites]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])
    with pytest.raises(DPCurveConfigError, match="num_sites=9.*8 subjects"):
        deal_sites(samples, train, 9, seed=0)


def test_batched_local_training_equals_each_site_trained_alone():
    """The sites' local steps run batched in closed form; each must equal autograd SGD."""
    torch.manual_seed(0)
    feats, y = torch.randn(30, 5), torch.arange(30) % 3
    holders = [("a", np.arange(0, 7)), ("b", np.arange(7, 30))]  # unequal: padding masked
    head = torch.nn.Linear(5, 3)
    w, b = local_gd(head.weight.detach(), head.bias.detach(), *_padded(holders, feats, y, 3),
                    steps=7, lr=0.3)
    for j, (_, idx) in enumerate(holders):
        alone = torch.nn.Linear(5, 3)
        alone.load_state_dict(head.state_dict())
        _sgd(alone, feats[idx], y[idx], 7, 0.3, None, 0.0, seed=0)
        torch.testing.assert_close(w[j], alone.weight.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(b[j], alone.bias.detach(), rtol=0, atol=1e-6)


def test_the_public_draw_must_not_be_the_private_data():
    cfg = _compose(["dp_curve.public.seed=0", "data.seed=0"])
    with pytest.raises(DPCurveConfigError, match="dp_curve.public.seed"):
        public_data_config(cfg)
    assert public_data_config(_compose([])).seed == 1
    x, _ = images(6)
    meta = pd.DataFrame({"database": "db", "subject": "s", "clip": list("abcdef"), "label": 0})
    private = FlowSamples(x[:3].numpy(), meta[:3], ["a"])
    assert check_disjoint(private, FlowSamples(x[3:].numpy(), meta[3:], ["a"])) == 3
    with pytest.raises(DPCurveConfigError, match="shares 1 flow image"):
        check_disjoint(private, FlowSamples(x[2:5].numpy(), meta[2:5], ["a"]))


def test_dp_curve_runs_end_to_end_on_tiny_synme(tmp_path):
    cfg = _compose([
        "data.preset=tiny", "dp_curve.epsilons=[10]", "dp_curve.repeats=1",
        "dp_curve.extractor.epochs=2", "dp_curve.settings.labs_dp_sgd.rounds=2",
        "dp_curve.settings.labs_dp_sgd.local_steps=3",
        "dp_curve.settings.labs_dp_sgd.batch_size=3",
        "dp_curve.settings.pooled_dp_sgd.local_steps=5",
        "dp_curve.settings.pooled_dp_sgd.batch_size=4",
        "dp_curve.settings.sites_central_dp.num_sites=3",
        "dp_curve.settings.sites_central_dp.rounds=3"])
    run_dp_curve(cfg, tmp_path)
    for name in ("dp_curve.json", "dp_curve.md", "dp_curve.png", "extractor.pt"):
        assert (tmp_path / name).stat().st_size > 200, name
    saved = json.loads((tmp_path / "dp_curve.json").read_text())
    assert saved["synthetic"] is True and saved["public_seed"] != saved["data_seed"]
    assert [s["name"] for s in saved["settings"]] == ["labs_dp_sgd", "pooled_dp_sgd",
                                                      "sites_central_dp"]
    for s in saved["settings"]:
        (point,) = s["points"]
        assert 9.9 < point["epsilon"] <= 10.0 + 1e-9  # achieved, from the accountant
        assert 0 <= point["uf1"] <= 1 and 0 <= s["nonprivate"]["uf1"] <= 1
    labs = saved["settings"][0]
    assert labs["holders"] == 2 and all(q < 1 for q in labs["points"][0]["q"])  # Poisson
    assert saved["settings"][1]["points"][0]["q"] == [4 / saved["train_clips"]]
    assert saved["settings"][2]["holders"] == 3
    table = (tmp_path / "dp_curve.md").read_text()
    assert "SYNTHETIC" in table and "| sites_central_dp | 3 | " in table
    # the saved extractor serves any mer run as model=frozen_head
    net = create_model("frozen_head", num_classes=len(saved["classes"]), in_channels=3,
                       extractor=str(tmp_path / "extractor.pt"))
    assert net.extractor_sha256 == saved["extractor"]["sha256"]
