"""Classification losses of the recognition modules, as pure functions (``model.loss``).

``model.loss: {kind: ce}`` (the default) or ``{kind: focal, gamma: 2, alpha: null}``:

- ``ce``: cross-entropy.
- ``focal`` (Lin et al., 2017; MFDAN's loss for small, imbalanced classes):
  ``FL = -alpha_y * (1 - p_y)^gamma * log p_y``, averaged over the batch, with p_y the softmax
  probability of the true class. ``gamma = 0`` and no ``alpha`` is cross-entropy exactly.
  ``alpha``: null (1 for every class), a list of K class weights, or ``balanced`` (1 / n_k,
  the inverse class counts of the *training* split, scaled to mean 1 over its classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

LOSS_KINDS = ("ce", "focal")
# w_emotion / w_au weigh the AU networks' losses (AUMERModule): an experiment that sweeps
# over models sets them for every model; emotion-only networks have no AU loss to weigh
_AU_KEYS = {"w_emotion", "w_au"}
_KEYS = {"ce": {"kind"} | _AU_KEYS, "focal": {"kind", "gamma", "alpha"} | _AU_KEYS}


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Mean focal loss. logits (B, K) float, target (B,) int64, alpha (K,) or None -> ()."""
    logp = F.log_softmax(logits, dim=1).gather(1, target[:, None])[:, 0]
    weight = (1.0 - logp.exp()).clamp_min(0.0) ** gamma if gamma else torch.ones_like(logp)
    if alpha is not None:
        weight = weight * alpha.to(logits)[target]
    return -(weight * logp).mean()


def balanced_alpha(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse class frequencies of ``labels`` (N,), scaled to mean 1 over the classes present;
    a class absent from ``labels`` gets weight 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    inv = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    present = counts > 0
    inv[present] *= present.sum() / inv[present].sum()
    inv[~present] = 1.0
    return inv.tolist()


def resolve_loss(cfg: dict | None, train_labels: np.ndarray | None,
                 num_classes: int) -> dict:
    """A checked ``model.loss`` with ``alpha: balanced`` replaced by the training split's
    weights. Raises ValueError naming the bad key and the accepted ones."""
    cfg = dict(cfg or {})
    kind = cfg.get("kind", "ce")
    if kind not in LOSS_KINDS:
        raise ValueError(f"model.loss.kind={kind!r}: use one of {list(LOSS_KINDS)} (e.g. "
                         "model.loss={kind: focal, gamma: 2})")
    cfg["kind"] = kind
    unknown = sorted(set(cfg) - _KEYS[kind])
    if unknown:
        raise ValueError(f"model.loss: unknown key(s) {unknown} for kind {kind}; known: "
                         f"{sorted(_KEYS[kind])}")
    alpha = cfg.get("alpha")
    if alpha == "balanced":
        if train_labels is None or len(train_labels) == 0:
            alpha = None  # no training split here (a federated client's template): uniform
        else:
            alpha = balanced_alpha(train_labels, num_classes)
    elif alpha is not None:
        if isinstance(alpha, str) or len(alpha) != num_classes:
            raise ValueError(f"model.loss.alpha={alpha!r}: null, 'balanced' or a list of "
                             f"{num_classes} class weights")
        alpha = [float(a) for a in alpha]
    for k in _AU_KEYS:
        cfg.pop(k, None)
    if kind == "focal":
        cfg["gamma"] = float(cfg.get("gamma", 2.0))
        if cfg["gamma"] < 0:
            raise ValueError(f"model.loss.gamma={cfg['gamma']}: must be >= 0")
        cfg["alpha"] = alpha
    return cfg


def make_loss(cfg: dict | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(logits, target) -> loss`` for a resolved ``model.loss`` (:func:`resolve_loss`)."""
    cfg = cfg or {}
    if cfg.get("kind", "ce") == "ce":
        return F.cross_entropy
    gamma = float(cfg.get("gamma", 2.0))
    alpha: Sequence[float] | None = cfg.get("alpha")
    weights = None if alpha is None else torch.tensor(alpha, dtype=torch.float32)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, gamma, weights)

    return loss
