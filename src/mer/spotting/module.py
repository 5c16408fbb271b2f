"""Training learned spotters: windows of long videos, a LightningModule, sliding inference.

A learned spotter's network maps a batch of windows ``{key: (B, W, ...)}`` to per-position
scores (B, W, 2) (micro, macro) in [0, 1]. :class:`SpotModule` trains it by regression on the
apex-score targets (:func:`mer.spotting.videos.gaussian_targets`) with the engine's
conventions (``training_step`` logging ``train_loss``, Adam/AdamW/SGD,
``on_fit_start`` flushing denormals). :class:`WindowSet` cuts videos into windows of W
positions; training keeps every window that holds a ground truth plus ``neg_ratio`` times as
many without (seeded). :func:`sliding_scores` scores a whole video window by window
(overlapping by half, averaged with a triangular weight), so memory stays bounded for any
video length.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mer.engine.module import make_optimizer

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class WindowSet(Dataset):
    """Windows of W positions over several videos' inputs.

    Args:
        inputs: per video, ``{key: (T, ...) array}`` (all keys share T).
        targets: per video, (T, 2) float32 targets, or None at inference.
        window: W.
        starts: ``[(video index, start position)]``.
        extra: per video, a function ``(start, end) -> {key: tensor}`` adding fixed-size items
            (e.g. ME-TST's recognition spans), or None.
    """

    def __init__(self, inputs: list[dict[str, np.ndarray]], targets: list[np.ndarray] | None,
                 window: int, starts: list[tuple[int, int]], extra=None) -> None:
        self.inputs, self.targets, self.window, self.starts = inputs, targets, window, starts
        self.extra = extra

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v, s = self.starts[i]
        length = len(next(iter(self.inputs[v].values())))
        e = min(length, s + self.window)
        item = {k: torch.as_tensor(_pad(a[s:e], self.window)) for k, a in self.inputs[v].items()}
        mask = np.zeros(self.window, dtype=np.float32)
        mask[: e - s] = 1
        item["mask"] = torch.as_tensor(mask)
        if self.targets is not None:
            item["y"] = torch.as_tensor(_pad(self.targets[v][s:e], self.window))
        if self.extra is not None and self.extra[v] is not None:
            item.update(self.extra[v](s, e))
        return item


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
        return a
    out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
    out[: len(a)] = a
    return out


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts covering ``0..length-1`` with windows of ``window`` every ``stride``."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def training_starts(targets: list[np.ndarray], window: int, neg_ratio: float,
                    rng: np.random.Generator) -> list[tuple[int, int]]:
    """Windows (stride W/2) holding a target > 0.1, plus ``neg_ratio`` times as many without."""
    pos, neg = [], []
    for v, y in enumerate(targets):
        for s in window_starts(len(y), window, max(1, window // 2)):
            (pos if (y[s: s + window] > 0.1).any() else neg).append((v, s))
    n_neg = min(len(neg), int(round(neg_ratio * max(1, len(pos)))))
    keep = [neg[i] for i in sorted(rng.choice(len(neg), size=n_neg, replace=False))] if n_neg \
        else []
    return pos + keep


class SpotModule(L.LightningModule):
    """Per-position score regression: weighted MSE between scores and targets (positions
    near a ground truth weigh ``1 + pos_weight * y``), padding masked out.

    The engine's neutral training hooks (as :class:`mer.engine.module.MERModule`), installed
    by whoever trains it (a federated lab: FedProx's term, SCAFFOLD's correction):
    :attr:`loss_terms` (``net -> 0-dim tensor`` added to the loss), :attr:`grad_hooks`
    (``net -> None`` before each optimiser step) and :meth:`set_optimizer`."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer: str = "adam", pos_weight: float = 4.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.pos_weight = pos_weight
        self.momentum: float | None = None
        self.loss_terms: list = []
        self.grad_hooks: list = []

    def set_optimizer(self, name: str, lr: float | None = None,
                      momentum: float | None = None) -> None:
        """Train with optimiser ``name`` (adam, adamw, sgd) instead of the configured one
        (``lr`` None: the module's; ``momentum``: sgd's, None: 0.9)."""
        self.optimizer_name = name
        if lr is not None:
            self.lr = float(lr)
        self.momentum = None if momentum is None else float(momentum)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.grad_hooks:
            hook(self.net)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch)

    def spotting_loss(self, scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        y, mask = batch["y"], batch["mask"].unsqueeze(-1)
        w = (1 + self.pos_weight * y) * mask
        return (w * (scores - y) ** 2).sum() / w.sum().clamp(min=1e-6)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.spotting_loss(self(batch), batch)

    def on_fit_start(self) -> None:
        torch.set_flush_denormal(True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True,
                 batch_size=len(batch["mask"]))
        for term in self.loss_terms:
            loss = loss + term(self.net)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_name, self.lr, self.weight_decay,
                              self.momentum)


# the Trainer settings of a spotter's training (with logger, checkpointing, progress off)
TRAINER = {"accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0,
           "log_every_n_steps": 1}


def seeded_loader(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Seed every generator with ``seed`` and return the shuffled training loader: training
    from here on is a function of (module, data, seed) alone."""
    L.seed_everything(seed, workers=False, verbose=False)
    return DataLoader(data, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def fit_module(module: L.LightningModule, data: Dataset, epochs: int, batch_size: int,
               seed: int) -> dict:
    """Train ``module`` on ``data`` for ``epochs`` with a fresh CPU Trainer; the last loss."""
    loader = seeded_loader(data, batch_size, seed)
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" lines per fold and client
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **TRAINER)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        try:
            trainer.fit(module, loader)
        finally:
            quiet.setLevel(level)
    loss = trainer.callback_metrics.get("train_loss")
    return {"epochs": epochs, "windows": len(data),
            "final_loss": None if loss is None else float(loss)}


@torch.no_grad()
def sliding_scores(net: nn.Module, inputs: dict[str, np.ndarray], window: int,
                   batch_size: int = 16, channels: int = 2) -> np.ndarray:
    """(T, channels) scores of a whole video from windows of ``window`` positions overlapping
    by half, averaged with a triangular weight (the edges of a window count least)."""
    length = len(next(iter(inputs.values())))
    starts = window_starts(length, window, max(1, window // 2))
    data = WindowSet([inputs], None, window, [(0, s) for s in starts])
    total = np.zeros((length, channels))
    weight = np.zeros((length, 1))
    tri = np.minimum(np.arange(1, window + 1), np.arange(window, 0, -1)).astype(np.float64)
    tri = (tri / tri.max())[:, None] + 1e-3
    was = net.training
    net.eval()
    for b in range(0, len(starts), batch_size):
        items = [data[i] for i in range(b, min(len(starts), b + batch_size))]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out = net(batch).detach().cpu().numpy()
        for j, s in enumerate(starts[b: b + batch_size]):
            e = min(length, s + window)
            total[s:e] += out[j, : e - s] * tri[: e - s]
            weight[s:e] += tri[: e - s]
    net.train(was)
    return total / np.maximum(weight, 1e-9)


def feature_scale(features: list[np.ndarray]) -> np.ndarray:
    """Per-channel robust scale (the 99th percentile of |x|, at least 1e-3) of training
    features: inputs are divided by it so that every spotter sees values of order 1."""
    x = np.concatenate(features, axis=0)
    return np.maximum(np.percentile(np.abs(x), 99, axis=0), 1e-3).astype(np.float32)
