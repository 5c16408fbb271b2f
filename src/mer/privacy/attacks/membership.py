"""Membership inference: was this flow image in the model's training set?

Loss-threshold attack (Yeom et al., 2018): training samples tend to have a lower loss, so the
attacker scores a sample by ``-loss`` and calls it a member above a threshold. Reported:
the ROC AUC over all thresholds (0.5 = no better than chance) and the membership advantage
``max_t (TPR - FPR)`` (an empirical lower bound on what DP bounds: with (epsilon, delta)-DP
the advantage is at most ``(e^epsilon - 1 + 2 delta) / (e^epsilon + 1)``).

:func:`train_target` trains the attacked model with mer's own Lightning module, with or
without DP-SGD (:mod:`mer.privacy.dp`), so the attack measures what the project trains.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

from mer.privacy.attacks import one_thread


def per_sample_losses(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 256) -> np.ndarray:
    """Cross-entropy of each sample, x (N, C, H, W), y (N,) -> (N,), eval mode."""
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = net(x[i:i + batch_size])
            logits = getattr(logits, "logits", logits)
            out.append(F.cross_entropy(logits, y[i:i + batch_size], reduction="none"))
    return torch.cat(out).numpy()


def loss_threshold_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """AUC and advantage of the loss-threshold attack (score = -loss).

    Returns ``{"auc", "advantage", "threshold"}`` (threshold: the loss below which the
    best-advantage attacker says "member")."""
    scores = -np.concatenate([member_losses, nonmember_losses])
    truth = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    return {"auc": float(roc_auc_score(truth, scores)), "advantage": float(tpr[best] - fpr[best]),
            "threshold": float(-thresholds[best])}


def train_target(x: torch.Tensor, y: torch.Tensor, epochs: int, model: str = "ststnet",
                 lr: float = 1e-3, batch_size: int = 16, dp=None, seed: int = 0,
                 model_kwargs: dict | None = None) -> tuple[nn.Module, float | None]:
    """Train the attacked model on (x (N, C, H, W), y (N,)) with mer's MERModule.

    ``dp``: a :class:`mer.privacy.dp.DPConfig` for DP-SGD (the net is then converted by
    ``fix_module``; use the same for the non-private run to compare like with like).
    Returns ``(net, epsilon)`` (epsilon None without DP).
    """
    from mer.data.datamodule import SplitDataModule
    from mer.data.samples import FlowSamples
    from mer.engine.module import MERModule
    from mer.models.registry import create_model
    from mer.privacy.dp import ClientPrivacy, fix_module, make_private

    L.seed_everything(seed, verbose=False)
    n_classes = int(y.max()) + 1
    meta = pd.DataFrame({"database": "target", "subject": [f"s{i}" for i in range(len(y))],
                         "clip": [f"c{i}" for i in range(len(y))], "label": y.numpy()})
    samples = FlowSamples(x.numpy().astype(np.float32), meta, [str(c) for c in range(n_classes)])
    net = create_model(model, num_classes=n_classes, in_channels=x.shape[1],
                       **(model_kwargs or {}))
    module = fix_module(MERModule(net, n_classes, lr=lr))
    dm = SplitDataModule(samples, np.arange(len(y)), np.arange(min(2, len(y))),
                         batch_size=batch_size, seed=seed)
    privacy = None
    if dp is not None:
        privacy = ClientPrivacy("target", dp)
        module, dm = make_private(module, dm, dp, privacy, seed=seed)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
    return module.net, (privacy.epsilon() if privacy else None)
