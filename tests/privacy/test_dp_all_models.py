"""Issue #15: DP-SGD (``privacy=dp``) for every new recogniser, extra inputs included.

Each model from its real config (``conf/model/<name>.yaml``) on SynME tiny: one federated
round under DP-SGD spends a positive epsilon, and Opacus' clipping acts on one per-sample
gradient per training sample (checked on the ``grad_sample`` of the actual model, inside the
DPOptimizer's step). With noise 0, the DP step equals a step by hand: each sample's gradient
of the module's own loss on that sample alone (plain autograd, fed the batch as training
feeds it: named inputs, AU targets, landmarks), clipped to C, averaged, times -lr.
"""

import copy
import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from opacus.optimizers import DPOptimizer

from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.data.sources import load_samples
from mer.engine.au_module import AUMERModule
from mer.engine.build import build_module
from mer.engine.module import MERModule
from mer.federated.loop import FederatedRun, make_clients
from mer.privacy.dp import (
    ClientPrivacy,
    DPConfig,
    DPUnsupportedModel,
    fix_module,
    make_private,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
CONF = str(Path(__file__).resolve().parents[2] / "conf")
MODELS = ["mfdan", "dense_attention", "mpfnet_p", "mpfnet_c", "dpk_gat"]
# how each gets its per-sample gradients (mer.privacy.dp.resolve_grad_sample)
MODES = {"mfdan": "functorch", "dense_attention": "hooks", "mpfnet_p": "hooks",
         "mpfnet_c": "hooks", "dpk_gat": "functorch"}
CLIP = 1e-3  # small enough that every sample's gradient is clipped


def _cfg(model: str, *extra: str):
    overrides = ["+experiment=fed_psyau", f"model={model}", "data.preset=tiny",
                 "federated.rounds=1", "federated.local_epochs=1", "federated.baselines=false",
                 "federated.workers=1", "privacy=dp", *extra]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture
def clipping_log(monkeypatch):
    """Every DPOptimizer clip of the test: per-sample gradients and the clipped sum."""
    steps = []
    original = DPOptimizer.clip_and_accumulate

    def record(self):
        grad_samples = [g.detach().clone() for g in self.grad_samples]
        original(self)
        steps.append({"grad_samples": grad_samples, "max_grad_norm": self.max_grad_norm,
                      "summed": [p.summed_grad.detach().clone() for p in self.params]})

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", record)
    return steps


def _clip_factors(grad_samples: list[torch.Tensor], c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample norms (B,), Opacus' clip factors min(1, C / (norm + 1e-6)))."""
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grad_samples], 1).norm(dim=1)
    return norms, (c / (norms + 1e-6)).clamp(max=1.0)


@pytest.mark.parametrize("model", MODELS)
def test_one_federated_dp_round_clips_each_sample(model, clipping_log):
    cfg = _cfg(model, f"privacy.max_grad_norm={CLIP}")
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients)
    before = [w.copy() for w in run.global_weights]
    stats = run.round(1)
    assert not stats["failed"] and not stats.get("skipped"), stats
    assert max(float(np.abs(a - b).max()) for a, b in zip(run.global_weights, before)) > 0
    eps = run.epsilons()
    assert set(eps["clients"]) == {c.name for c in clients}
    assert all(e > 0 for e in eps["clients"].values())
    assert eps["model"]["grad_sample"] == MODES[model]
    assert any("GroupNorm" in k for k in eps["model"]["changes"])  # the fix, in the results
    # q = 1 (batch 64 > a tiny client's split): one step per client, every sample in it
    assert len(clipping_log) == len(clients)
    for step, client in zip(clipping_log, clients):
        rows = {len(g) for g in step["grad_samples"]}
        assert rows == {len(client.train_idx)}  # one per-sample gradient per training sample
        norms, factor = _clip_factors(step["grad_samples"], step["max_grad_norm"])
        assert (norms > CLIP).all()  # clipping is active for every sample
        assert ((norms * factor) <= CLIP * (1 + 1e-5)).all()
        for g, summed in zip(step["grad_samples"], step["summed"]):
            clipped = torch.einsum("i,i...", factor, g)
            torch.testing.assert_close(summed, clipped, rtol=1e-5, atol=1e-9)


# model.kwargs that make a forward pass deterministic (no dropout / DropKey) and, for
# mpfnet_c, its training stage 2 (generic encoder frozen; mpfnet_p's first step is stage 1)
DETERMINISTIC = {"mfdan": {"dropout": 0.0, "drop_key": 0.0}, "dense_attention": {"dropout": 0.0},
                 "mpfnet_p": {"dropout": 0.0},
                 "mpfnet_c": {"dropout": 0.0, "stage1_fraction": 0.0},
                 "dpk_gat": {"dropout": 0.0}}


def _module_and_data(model: str):
    cfg = _cfg(model)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["kwargs"] = {**model_cfg.get("kwargs", {}), **DETERMINISTIC[model]}
    torch.manual_seed(0)
    module = fix_module(build_module(model_cfg, samples, np.arange(len(samples.x))))
    module = module.double()  # float64: per-sample gradients equal to ~1e-12, not to rounding
    module.set_optimizer("sgd", lr=1.0, momentum=0.0)
    module.weight_decay = 0.0
    return module, samples


def _reference_gradients(module, batch) -> list[dict[str, torch.Tensor]]:
    """Per sample: the plain autograd gradient of the module's loss on that sample alone
    (None where the step does not reach a parameter), at the fit's first step."""
    ref = copy.deepcopy(module).train()
    if hasattr(ref.net, "set_progress"):
        ref.net.set_progress(0.0)  # the first step of a fit
    if isinstance(ref, AUMERModule):
        ref.net.set_prior_ratio(ref.prior_ratio_at(0, 1))
    named = [(k, p) for k, p in ref.net.named_parameters() if p.requires_grad]
    out = []
    for i in range(len(batch[1])):
        loss, _ = ref.compute_loss(tuple(t[i:i + 1] for t in batch))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        out.append({k: g for (k, _), g in zip(named, grads)})
    return out


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("model", MODELS)
def test_dp_step_without_noise_is_the_clipped_step_by_hand(model, n, clipping_log):
    module, samples = _module_and_data(model)
    train = np.arange(n)
    dm = SplitDataModule(samples, train, np.arange(n, n + 2), batch_size=n,
                         with_aus=isinstance(module, AUMERModule))
    dm.tensors = [t.double() if t.is_floating_point() else t for t in dm.tensors]
    batch = tuple(t[train] for t in dm.tensors)
    ref = _reference_gradients(module, batch)
    names = list(ref[0])
    reached = [k for k in names if ref[0][k] is not None]
    norms = torch.stack([torch.sqrt(sum(r[k].pow(2).sum() for k in reached)) for r in ref])
    clip = 0.5 * float(norms.min())  # clipping active for every sample
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    before = {k: p.detach().clone() for k, p in module.net.named_parameters()}

    dp = DPConfig(noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0)
    privacy = ClientPrivacy("lab0", dp)
    module, dp_dm = make_private(module, dm, dp, privacy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, limit_val_batches=0, max_steps=1,
                  max_epochs=1).fit(module, datamodule=dp_dm)
    assert privacy.steps == 1
    copy.deepcopy(module.net)  # nothing of torch.func's (vmap wrappers) left on the model

    # Opacus' per-sample gradients of the actual model = the references, and clipped to C
    (step,) = clipping_log
    params = dict(module.net.named_parameters())
    in_step = [k for k in names if k in reached or MODES[model] == "functorch"]
    assert len(step["grad_samples"]) == len(in_step)
    for k, g in zip(in_step, step["grad_samples"]):
        assert g.shape == (n, *params[k].shape)
        want = torch.stack([r[k] if r[k] is not None else torch.zeros_like(params[k])
                            for r in ref])
        torch.testing.assert_close(g, want, rtol=1e-7, atol=1e-10)
    opacus_norms, opacus_factor = _clip_factors(step["grad_samples"], clip)
    assert ((opacus_norms * opacus_factor) <= clip * (1 + 1e-5)).all()

    # the update: -lr * mean_i clip_C(g_i); parameters the step does not reach stay put
    for k, p in module.net.named_parameters():
        delta = p.detach() - before[k]
        if ref[0].get(k) is None:
            torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=0)
            continue
        want = -sum(f * r[k] for f, r in zip(factor, ref)) / n
        torch.testing.assert_close(delta, want, rtol=1e-7, atol=1e-10)


def test_hooks_asked_for_a_network_they_cannot_take_is_refused_at_setup():
    cfg = _cfg("mfdan", "privacy.grad_sample=hooks")
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    with pytest.raises(DPUnsupportedModel, match=r"MFDAN.*privacy.grad_sample=auto"):
        FederatedRun(cfg, samples, make_clients(cfg, samples))


class _FoldsRowsIntoBatch(torch.nn.Module):
    """A Linear over 4 rows per sample folded into the batch (as DPK-GAT's patch CNN does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3 * 28 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = len(x)
        return self.lin(x.reshape(b * 4, -1)).view(b, 4, 3).mean(1)


def test_a_layer_that_batches_over_more_than_the_samples_is_refused():
    """Opacus' hooks would clip such a layer's rows, not samples: the step refuses."""
    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"database": "db", "subject": f"s{i}", "clip": f"c{i}", "label": i % 3}
                         for i in range(6)])
    samples = FlowSamples(rng.standard_normal((6, 3, 28, 28)).astype(np.float32), rows,
                          ["a", "b", "c"])
    module = MERModule(_FoldsRowsIntoBatch(), 3)
    dm = SplitDataModule(samples, np.arange(6), np.arange(2), batch_size=6)
    dp = DPConfig(noise_multiplier=0.0, sample_rate=1.0)
    module, dp_dm = make_private(module, dm, dp, ClientPrivacy("lab0", dp))
    with warnings.catch_warnings(), pytest.raises(DPUnsupportedModel, match="24 per-sample"):
        warnings.simplefilter("ignore")
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, limit_val_batches=0, max_steps=1,
                  max_epochs=1).fit(module, datamodule=dp_dm)
