"""The base LightningModule: one network, its loss, metrics and optimiser."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from mer.engine.metrics import recognition_metrics

# Lightning 2.6 on torch 2.14 warns at every fit about its own use of a torch API (LeafSpec);
# nothing a user can act on, and it floods federated runs (one Trainer per client per round).
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class MERModule(L.LightningModule):
    """Emotion classification of flow images with cross-entropy (or ``loss``: focal, see
    :mod:`mer.engine.losses`).

    Batches are ``(x, y)`` with x (B, C, H, W) float and y (B,) int64, followed by the
    network's named inputs when it declares any (``net.input_names``, e.g. ``(x, y,
    apex_crop)``; :mod:`mer.data.inputs`): the network is called ``net(x, *inputs)``.
    ``predict_step`` returns class probabilities (B, K). Subclasses with extra heads or losses
    override :meth:`compute_loss`.

    A neutral hook a network may offer: ``set_progress(f)`` gets the fraction of training done
    (0 at the first step, -> 1) before each training batch (staged training, e.g. MPFNet);
    ``optimizer_groups(lr)`` gives the optimiser's parameter groups (per-part learning rates).

    Neutral training hooks, installed by whoever trains the module (the federated client does,
    the engine knows nothing of what they are for): :attr:`loss_terms`, callables ``net ->``
    0-dim tensor added to each training loss (e.g. a proximal term); :attr:`grad_hooks`,
    callables ``net -> None`` run after backward, before every optimiser step (e.g. a gradient
    correction); :meth:`set_optimizer` replaces the configured optimiser.
    """

    def __init__(
        self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.0,
        optimizer: str = "adam", class_names: list[str] | None = None,
        loss: dict | None = None,
    ) -> None:
        super().__init__()
        from mer.engine.losses import make_loss

        self.net = net
        self.num_classes = num_classes
        self.loss_cfg = dict(loss or {"kind": "ce"})
        self.loss_fn = make_loss(self.loss_cfg)
        self.n_inputs = len(getattr(net, "input_names", ()) or ())
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self._val_preds: list[torch.Tensor] = []
        self._val_true: list[torch.Tensor] = []
        self.momentum: float | None = None
        # the neutral training hooks (see the class docstring); empty outside such training
        self.loss_terms: list[Callable[[nn.Module], torch.Tensor]] = []
        self.grad_hooks: list[Callable[[nn.Module], None]] = []

    def set_optimizer(self, name: str, lr: float | None = None,
                      momentum: float | None = None) -> None:
        """Train with optimiser ``name`` (adam, adamw, sgd) instead of the configured one;
        ``lr`` None keeps the module's; ``momentum`` (sgd only) None: 0.9. SCAFFOLD's clients
        use plain SGD (``momentum=0``)."""
        self.optimizer_name = name
        if lr is not None:
            self.lr = float(lr)
        self.momentum = None if momentum is None else float(momentum)

    def on_fit_start(self) -> None:
        # A converged model's tiny gradients and activations go subnormal, and subnormal float
        # math on x86 CPUs is 20x+ slower: DPK-GAT's epochs slowed from 0.2 s to 5 s after
        # ~60 epochs. Flushing them to zero changes nothing measurable in the results.
        torch.set_flush_denormal(True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for hook in self.grad_hooks:
            hook(self.net)

    def forward(self, x: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(x, *inputs)

    def _inputs(self, batch) -> tuple[torch.Tensor, ...]:
        """The network's named inputs of a batch (after x, y)."""
        if not self.n_inputs:
            return ()
        inputs = tuple(batch[2:2 + self.n_inputs])
        if len(inputs) != self.n_inputs:
            raise ValueError(
                f"{type(self.net).__name__} needs inputs {list(self.net.input_names)} after "
                f"(x, y) in each batch, got {len(inputs)} tensors: build the datamodule from "
                "samples whose inputs were provided (mer.engine.build.build_module does it)")
        return inputs

    def compute_loss(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) for a batch."""
        x, y = batch[0], batch[1]
        logits = self(x, *self._inputs(batch))
        return self.loss_fn(logits, y), logits

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if hasattr(self.net, "set_progress"):
            total = float(self.trainer.estimated_stepping_batches or 1)
            done = self.global_step / max(1.0, total) if math.isfinite(total) else 0.0
            self.net.set_progress(min(1.0, done))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss + self.extra_loss()

    def extra_loss(self) -> torch.Tensor | float:
        """The sum of the installed :attr:`loss_terms` on the net (0.0 without any)."""
        total: torch.Tensor | float = 0.0
        for term in self.loss_terms:
            total = total + term(self.net)
        return total

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
        if isinstance(batch, (tuple, list)):
            return torch.softmax(self(batch[0], *self._inputs(batch)), dim=1)
        return torch.softmax(self(batch), dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_name, self.lr, self.weight_decay,
                              self.momentum)


def make_optimizer(params, name: str, lr: float, weight_decay: float,
                   momentum: float | None = None) -> torch.optim.Optimizer:
    """The optimiser a model config names: adam, adamw, or sgd (``momentum``, None: 0.9)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if momentum is None else momentum,
                               weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}': adam, adamw or sgd")
