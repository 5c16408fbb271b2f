"""A small trainable head over a frozen feature extractor: DP noise spread over few parameters.

``FrozenHead``: x (B, C, H, W) -> extractor (frozen, always in eval mode) -> features (B, F),
standardised with the extractor's own feature mean / std -> ``head`` Linear(F, num_classes)
-> logits (B, num_classes).

The extractor is trained elsewhere, on data that is not private (``mer.experiments.dp_curve``
pretrains it on a separate SynME draw), and saved as an *extractor file* (``torch.save`` of a
dict, :func:`extractor_record`)::

    {"format": "mer-extractor-1", "model": "ststnet", "kwargs": {...}, "feature_dim": F,
     "state_dict": {...}, "feature_mean": (F,), "feature_std": (F,), "trained_on": {...}}

The extractor is a registered network built with ``num_classes=F`` (for STSTNet: the 400
pooled maps -> a learned F-dim projection), so any registered model can serve.

The extractor is deliberately **not a submodule**: it is outside ``parameters()`` and
``state_dict()``. An optimiser, Opacus' per-sample hooks, a federation's aggregation, secure
aggregation and central DP's clipping and noise therefore see the head only, and the
extractor's weights cannot change (tested bit-identical after DP training). Every copy of the
model (server, labs) loads the same extractor file; :attr:`FrozenHead.extractor_sha256`
names it. Batch norm inside the frozen extractor runs on its stored statistics (eval mode),
one sample at a time, so per-sample gradients and DP accounting are unaffected.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from mer.models.registry import create_model, register_model

EXTRACTOR_FORMAT = "mer-extractor-1"
_KEYS = ("model", "kwargs", "feature_dim", "state_dict", "feature_mean", "feature_std")


def extractor_record(backbone: nn.Module, model: str, kwargs: dict, feature_dim: int,
                     feature_mean: torch.Tensor, feature_std: torch.Tensor,
                     trained_on: dict | None = None) -> dict:
    """The dict an extractor file holds (see the module docstring)."""
    return {"format": EXTRACTOR_FORMAT, "model": model, "kwargs": dict(kwargs),
            "feature_dim": int(feature_dim),
            "state_dict": {k: v.detach().clone() for k, v in backbone.state_dict().items()},
            "feature_mean": feature_mean.detach().float().clone(),
            "feature_std": feature_std.detach().float().clone(),
            "trained_on": dict(trained_on or {})}


def load_extractor_record(path: str | Path) -> dict:
    """Read and check an extractor file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mer extractor file, or a key is missing.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"extractor file {path} does not exist; make one with "
                                "python -m mer.run +experiment=dp_curve (it writes extractor.pt "
                                "in the run folder)")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != EXTRACTOR_FORMAT:
        raise ValueError(f"{path} is not a mer extractor file (format "
                         f"{record.get('format') if isinstance(record, dict) else type(record)}"
                         f", expected {EXTRACTOR_FORMAT})")
    missing = [k for k in _KEYS if k not in record]
    if missing:
        raise ValueError(f"extractor file {path} lacks {missing}; rewrite it with "
                         "mer.models.frozen_head.extractor_record")
    return record


def record_sha256(record: dict) -> str:
    """SHA-256 of an extractor's weights and feature statistics (names the extractor)."""
    buf = io.BytesIO()
    for key in sorted(record["state_dict"]):
        buf.write(key.encode())
        buf.write(record["state_dict"][key].detach().cpu().contiguous().numpy().tobytes())
    for key in ("feature_mean", "feature_std"):
        buf.write(record[key].detach().cpu().float().contiguous().numpy().tobytes())
    return hashlib.sha256(buf.getvalue()).hexdigest()


@register_model("frozen_head")
class FrozenHead(nn.Module):
    """A trainable Linear head over a frozen extractor. ``forward``: (B, C, H, W) -> (B, K).

    Args:
        num_classes: K.
        in_channels: C of the input flow images.
        extractor: an extractor file (see the module docstring), or a record dict; None: a
            randomly initialised ``backbone`` (tests, or a head over random features).
        feature_dim: F when ``extractor`` is None (otherwise the file's).
        backbone, backbone_kwargs: the registered network used when ``extractor`` is None.
        seed: seed of the random backbone when ``extractor`` is None.
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 3,
                 extractor: str | Path | dict | None = None, feature_dim: int = 16,
                 backbone: str = "ststnet", backbone_kwargs: dict | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if extractor is None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = create_model(backbone, num_classes=feature_dim, in_channels=in_channels,
                                   **dict(backbone_kwargs or {}))
            record = extractor_record(net, backbone, dict(backbone_kwargs or {}), feature_dim,
                                      torch.zeros(feature_dim), torch.ones(feature_dim))
        else:
            record = extractor if isinstance(extractor, dict) else \
                load_extractor_record(extractor)
        frozen = create_model(record["model"], num_classes=int(record["feature_dim"]),
                              in_channels=in_channels, **dict(record["kwargs"]))
        frozen.load_state_dict(record["state_dict"])
        for p in frozen.parameters():
            p.requires_grad_(False)
        frozen.eval()
        # Not a submodule (see the module docstring): bypass nn.Module.__setattr__.
        object.__setattr__(self, "extractor", frozen)
        object.__setattr__(self, "feature_mean", record["feature_mean"].float().clone())
        object.__setattr__(self, "feature_std",
                           record["feature_std"].float().clamp_min(1e-6).clone())
        self.extractor_sha256 = record_sha256(record)
        self.feature_dim = int(record["feature_dim"])
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> standardised frozen features (B, F), without gradient."""
        with torch.no_grad():
            self.extractor.eval()
            f = self.extractor(x)
            return (f - self.feature_mean.to(f)) / self.feature_std.to(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> FrozenHead:
        super().train(mode)
        self.extractor.eval()  # dropout off, batch norm on its stored statistics, always
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(): the extractor follows
        super()._apply(fn, recurse)
        self.extractor._apply(fn, recurse)
        object.__setattr__(self, "feature_mean", fn(self.feature_mean))
        object.__setattr__(self, "feature_std", fn(self.feature_std))
        return self

    def extra_repr(self) -> str:
        return f"frozen extractor {self.extractor_sha256[:12]} (F={self.feature_dim})"
