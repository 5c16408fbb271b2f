"""Build the LightningModule for a model config and a training split."""

from __future__ import annotations

import numpy as np

from mer.data.samples import FlowSamples
from mer.engine.module import MERModule
from mer.models.registry import create_model


def build_module(model_cfg: dict, samples: FlowSamples, train_idx: np.ndarray,
                 prior_counts: np.ndarray | None = None) -> MERModule:
    """A fresh module for ``model_cfg`` (name, lr, weight_decay, optimizer, kwargs, loss, prior).

    Networks that predict AUs (``net.uses_aus``) get an :class:`AUMERModule`, and their data
    prior is counted from the AU annotations of ``train_idx`` only: never from test samples.
    ``prior_counts`` (12, 12): those counts, summed elsewhere (a federation's server adds the
    labs' counts without their annotations).
    """
    net = create_model(model_cfg["name"], num_classes=samples.num_classes,
                       in_channels=samples.x.shape[1], **model_cfg.get("kwargs", {}))
    common = dict(lr=model_cfg["lr"], weight_decay=model_cfg["weight_decay"],
                  optimizer=model_cfg["optimizer"], class_names=samples.class_names)
    if not getattr(net, "uses_aus", False):
        return MERModule(net, samples.num_classes, **common)
    from mer.engine.au_module import AUMERModule
    from mer.models.priors import cooccurrence_counts, data_prior

    if hasattr(net, "set_data_prior"):
        if prior_counts is None:
            au, mask = samples.au_targets()
            prior_counts = cooccurrence_counts(au[train_idx], mask[train_idx])
        net.set_data_prior(data_prior(prior_counts))
    loss, prior = model_cfg.get("loss") or {}, model_cfg.get("prior") or {}
    return AUMERModule(
        net, samples.num_classes, w_emotion=loss.get("w_emotion", 0.2),
        w_au=loss.get("w_au", 0.8), prior_schedule=prior.get("schedule", "decay"),
        prior_ratio0=prior.get("ratio", 1.0), **common,
    )


def uses_aus(module: MERModule) -> bool:
    """True when the module's batches must carry AU targets and masks."""
    return bool(getattr(module.net, "uses_aus", False))
