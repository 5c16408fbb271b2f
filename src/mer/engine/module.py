"""The base LightningModule: one network, its loss, metrics and optimiser."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from mer.engine.metrics import recognition_metrics

# Lightning 2.6 on torch 2.14 warns at every fit about its own use of a torch API (LeafSpec);
# nothing a user can act on, and it floods federated runs (one Trainer per client per round).
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class MERModule(L.LightningModule):
    """Emotion classification of flow images with cross-entropy.

    Batches are ``(x, y)`` with x (B, C, H, W) float and y (B,) int64. ``predict_step`` returns
    class probabilities (B, K). Subclasses with extra heads or losses override
    :meth:`compute_loss`.
    """

    def __init__(
        self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0,
        optimizer: str = "adam", class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self._val_preds: list[torch.Tensor] = []
        self._val_true: list[torch.Tensor] = []
        self.proximal_mu = 0.0
        self._proximal_anchor: list[torch.Tensor] = []
        self._grad_correction: dict[str, torch.Tensor] = {}

    def set_proximal(self, mu: float, anchor: list[torch.Tensor] | None = None) -> None:
        """FedProx: add ``mu/2 * ||w - anchor||^2`` over the net's parameters to the training
        loss (``anchor`` = the round's global parameters, in ``net.parameters()`` order)."""
        self.proximal_mu = float(mu)
        self._proximal_anchor = [a.detach().clone() for a in anchor] if anchor else []

    def set_grad_correction(self, correction: dict[str, torch.Tensor] | None) -> None:
        """SCAFFOLD: add ``correction[name]`` (= c - c_i, shaped like the parameter) to the
        gradient of each named parameter of the net before every optimiser step."""
        self._grad_correction = dict(correction or {})

    def on_fit_start(self) -> None:
        # A converged model's tiny gradients and activations go subnormal, and subnormal float
        # math on x86 CPUs is 20x+ slower: DPK-GAT's epochs slowed from 0.2 s to 5 s after
        # ~60 epochs. Flushing them to zero changes nothing measurable in the results.
        torch.set_flush_denormal(True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._grad_correction:
            return
        for name, p in self.net.named_parameters():
            if p.grad is not None and name in self._grad_correction:
                p.grad.add_(self._grad_correction[name].to(p.grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def compute_loss(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) for a batch."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss + self.proximal_loss()

    def proximal_loss(self) -> torch.Tensor | float:
        """The FedProx term, 0 outside federated training."""
        if not self.proximal_mu:
            return 0.0
        from mer.federated.fedprox import proximal_term

        return proximal_term(self.net.parameters(), self._proximal_anchor, self.proximal_mu)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self.compute_loss(batch)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        self._val_preds.append(logits.argmax(1).cpu())
        self._val_true.append(batch[1].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_true:
            return
        m = recognition_metrics(
            torch.cat(self._val_true).numpy(), torch.cat(self._val_preds).numpy(),
            self.class_names,
        )
        self.log_dict({"val_uf1": m["uf1"], "val_uar": m["uar"]})
        self._val_preds.clear()
        self._val_true.clear()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9,
                                   weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer '{self.optimizer_name}': adam, adamw or sgd")
