"""LightningModule for networks that also predict AUs (``net.uses_aus``), e.g. DPK-GAT."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from mer.engine.module import MERModule


class AUMERModule(MERModule):
    """Emotion + AU multi-task training: ``w_emotion * CE + w_au * net.au_loss``.

    Batches are ``(x, y, au, au_mask)`` or ``(x, y, au, au_mask, landmarks)``: x (B, C, S, S),
    y (B,) int64, au (B, 12) multi-hot over PSYAU_AUS, au_mask (B,) bool (True where the AUs
    are annotated; others add no AU loss), landmarks (B, 68, 2) pixel coordinates. Plain
    ``(x, y)`` batches are accepted too (no AU loss). The network's ``forward(x, landmarks)``
    returns an output with ``.logits`` and has ``au_loss(output, au, au_mask)``.

    Prior ratio (``net.set_prior_ratio``), set at the start of each training epoch e:
    ``decay``: r = prior_ratio0 * (1 - e / max_epochs), from prior_ratio0 at the first epoch
    down to prior_ratio0 / max_epochs at the last (centralised training); ``fixed``: r =
    prior_ratio0 throughout (federated: 0.3); ``official``: the FED-PsyAU authors' schedule
    ``r_e = r_(e-1) * (1 - (e + 1) / E)``, r_(-1) = prior_ratio0 (a product: it falls much
    faster and is 0 at the last epoch). ``decay`` on a network built with
    ``fidelity="official"`` means ``official``. Validation and prediction use the ratio of the
    last training epoch; it is saved in checkpoints. ``w_au = 0`` turns the AU loss off.
    """

    def __init__(
        self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0,
        optimizer: str = "adam", class_names: list[str] | None = None, w_emotion: float = 0.2,
        w_au: float = 0.8, prior_schedule: Literal["decay", "fixed", "official"] = "decay",
        prior_ratio0: float = 1.0,
    ) -> None:
        super().__init__(net, num_classes, lr=lr, weight_decay=weight_decay,
                         optimizer=optimizer, class_names=class_names)
        if prior_schedule not in ("decay", "fixed", "official"):
            raise ValueError(f"prior_schedule must be 'decay', 'fixed' or 'official', got "
                             f"{prior_schedule!r}")
        if prior_schedule == "decay" and getattr(net, "fidelity", "mer") == "official":
            prior_schedule = "official"
        self.w_emotion, self.w_au = w_emotion, w_au
        self.prior_schedule, self.prior_ratio0 = prior_schedule, prior_ratio0

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor | None = None):
        return self.net(x, landmarks)

    def prior_ratio_at(self, epoch: int, max_epochs: int | None) -> float:
        """The prior ratio r for a training epoch (0-based) under this module's schedule."""
        if self.prior_schedule == "fixed" or not max_epochs or max_epochs < 0:
            return self.prior_ratio0
        if self.prior_schedule == "official":
            return official_prior_ratio(self.prior_ratio0, epoch, max_epochs)
        return self.prior_ratio0 * (1.0 - epoch / max_epochs)

    def on_train_epoch_start(self) -> None:
        r = self.prior_ratio_at(self.current_epoch, self.trainer.max_epochs)
        if hasattr(self.net, "set_prior_ratio"):
            self.net.set_prior_ratio(r)

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """(total, emotion CE, AU loss, network output) for a batch."""
        x, y = batch[0], batch[1]
        landmarks = batch[4] if len(batch) > 4 else None
        out = self(x, landmarks)
        emotion = F.cross_entropy(out.logits, y)
        if len(batch) > 3 and self.w_au != 0:
            au = self.net.au_loss(out, batch[2], batch[3])
        else:
            au = emotion.new_zeros(())
        return self.w_emotion * emotion + self.w_au * au, emotion, au, out

    def compute_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        total, _, _, out = self.losses(batch)
        return total, out.logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        total, emotion, au, _ = self.losses(batch)
        n = len(batch[1])
        self.log("train_loss", total, on_step=False, on_epoch=True, batch_size=n)
        self.log("emotion_loss", emotion, on_step=False, on_epoch=True, batch_size=n)
        self.log("au_loss", au, on_step=False, on_epoch=True, batch_size=n)
        return total + self.extra_loss()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, (tuple, list)):
            x, landmarks = batch[0], (batch[4] if len(batch) > 4 else None)
        else:
            x, landmarks = batch, None
        return torch.softmax(self(x, landmarks).logits, dim=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if hasattr(self.net, "prior_ratio"):
            checkpoint["prior_ratio"] = float(self.net.prior_ratio)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "prior_ratio" in checkpoint and hasattr(self.net, "set_prior_ratio"):
            self.net.set_prior_ratio(checkpoint["prior_ratio"])


def official_prior_ratio(r0: float, epoch: int, max_epochs: int) -> float:
    """The FED-PsyAU authors' prior ratio at 0-based ``epoch`` of E = ``max_epochs``:
    ``prod_{e=0..epoch} (1 - (e + 1) / E) * r0`` (their ``ratio *= 1 - (epoch + 1) / epochs``
    at the start of each epoch)."""
    r = float(r0)
    for e in range(epoch + 1):
        r *= 1.0 - (e + 1) / max_epochs
    return r
