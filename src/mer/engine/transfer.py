"""Two-stage training: pretrain on other data (macro-expressions), hand the weights over, then
fine-tune on micro-expressions; as one config (``model.pretrain``).

``model.pretrain`` keys: ``data`` (a data config: ``data=synme_macro``'s, the macro rows of
CAS(ME)^2 ``{kind: casme_sq, options: {types: [macro]}}``, CAS(ME)^3's macro-expression sheet
``{kind: casme3, sheet: .../cas(me)3_part_A_MaE_label...xlsx}``, or any labelled clips in a
database layout), ``cache_dir``, ``epochs``, ``lr`` (default the model's), ``batch_size``,
``trainer`` (Lightning kwargs, default CPU); or ``checkpoint`` (a file: a Lightning
checkpoint or a state dict of the same network) instead of ``data``.

Per fold (:func:`pretrained_state`), pretraining never sees a subject the fold holds out:
when the pretraining data shares subjects with the fine-tuning data (same ``subject_key``:
database + subject, e.g. SynME's macro and micro sets, or CAS(ME)^2's macro and micro rows),
every macro clip of a subject that is not in the fold's *training* split (its test subjects,
and its validation subjects) is left out (:func:`pretraining_index`).

Hand-over (:func:`transfer_state`): every layer is loaded except the classification head
(``net.head_prefixes``) when it does not fit the fine-tuning classes (another number, or other
class names): the head keeps its fresh initialisation and a warning says so. A checkpoint of
a different architecture (a layer missing, unexpected or shaped differently outside the head)
is refused, naming the layers.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mer.data.samples import FlowSamples

log = logging.getLogger(__name__)

DEFAULT_HEADS = ("classifier.", "head.", "fc.")
_KEYS = {"data", "cache_dir", "epochs", "lr", "weight_decay", "batch_size", "trainer",
         "checkpoint", "seed"}


class TransferError(ValueError):
    """A pretraining stage or a checkpoint hand-over that cannot be done as asked."""


def head_prefixes(net: nn.Module) -> tuple[str, ...]:
    """State-dict name prefixes of the network's classification head(s)."""
    return tuple(getattr(net, "head_prefixes", DEFAULT_HEADS))


def transfer_state(net: nn.Module, state: dict[str, torch.Tensor], source: str,
                   same_classes: bool = True) -> dict:
    """Load ``state`` (a pretrained state dict) into ``net`` for fine-tuning.

    Returns ``{"loaded": [names], "reinitialised": [head names kept at their fresh init],
    "reason": str}``.

    Raises:
        TransferError: layers outside the head are missing, unexpected or differently shaped
            (a checkpoint of another architecture); the message names them.
    """
    own = net.state_dict()
    heads = head_prefixes(net)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    body = [k for k in missing + unexpected + reshaped if not k.startswith(heads)]
    if body:
        def listed(names: list[str]) -> str:
            names = [n for n in names if not n.startswith(heads)]
            return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")

        parts = [f"{what}: {listed(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected),
                  ("shaped differently", [f"{k} {tuple(state[k].shape)} vs "
                                          f"{tuple(own[k].shape)}" for k in reshaped]))
                 if listed(names)]
        raise TransferError(
            f"{source} does not fit {type(net).__name__}: it comes from a different "
            f"architecture or size; mismatched layers, {'; '.join(parts)}. Pretrain the same "
            "model with the same model.kwargs (size, widths) as the fine-tuning stage")
    head_keys = [k for k in own if k.startswith(heads)]
    head_bad = [k for k in head_keys if k in missing or k in reshaped] + \
        [k for k in unexpected if k.startswith(heads)]
    reason = ""
    if head_bad:
        reason = "its head does not fit the fine-tuning classes (" + ", ".join(
            f"{k} {tuple(state[k].shape) if k in state else 'absent'} vs "
            f"{tuple(own[k].shape) if k in own else 'absent'}" for k in head_bad[:4]) + ")"
    elif not same_classes:
        reason = "its classes differ from the fine-tuning classes"
    keep_fresh = set(head_keys) if reason else set()
    loaded = [k for k in own if k in state and k not in keep_fresh]
    net.load_state_dict({**own, **{k: state[k] for k in loaded}})
    if reason:
        log.warning("%s: %s; the head (%s) is re-initialised, the other %d tensors are loaded",
                    source, reason, ", ".join(sorted({k.rsplit('.', 1)[0] for k in head_keys})),
                    len(loaded))
    return {"loaded": loaded, "reinitialised": sorted(keep_fresh), "reason": reason}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The network state dict in a Lightning checkpoint (``state_dict`` with ``net.``
    prefixes) or a plain ``torch.save``d state dict. TransferError naming the file if neither."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TransferError(f"model.pretrain.checkpoint={path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TransferError(f"model.pretrain.checkpoint={path} cannot be read as a torch "
                            f"checkpoint ({exc})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise TransferError(f"model.pretrain.checkpoint={path} holds no state dict of tensors")
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    return state


def pretraining_index(micro: FlowSamples, train_idx: np.ndarray,
                      macro: FlowSamples) -> tuple[np.ndarray, list[str]]:
    """Positions of the ``macro`` samples a fold may pretrain on, and the subjects left out.

    A macro clip is left out when its ``subject_key`` is a subject of ``micro`` that is not
    in ``micro``'s training split ``train_idx`` (a test or validation subject of the fold).
    Subjects that only the macro data has are kept.
    """
    keys = micro.meta["subject_key"].to_numpy()
    held_out = set(keys) - set(keys[np.asarray(train_idx, dtype=np.int64)])
    macro_keys = macro.meta["subject_key"].to_numpy()
    drop = np.isin(macro_keys, sorted(held_out))
    return np.flatnonzero(~drop), sorted(set(macro_keys[drop]))


def check_config(pre: dict) -> None:
    """TransferError for an unknown key or neither/both of ``data`` and ``checkpoint``."""
    unknown = sorted(set(pre) - _KEYS)
    if unknown:
        raise TransferError(f"model.pretrain: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    if bool(pre.get("data")) == bool(pre.get("checkpoint")):
        raise TransferError("model.pretrain needs exactly one of data (a data config to "
                            "pretrain on) and checkpoint (a file of pretrained weights)")


def load_pretrain_samples(pre: dict, cache_dir: str | Path | None = None) -> FlowSamples:
    """The pretraining data of ``model.pretrain`` (``data``), via ``load_samples``."""
    from omegaconf import OmegaConf

    from mer.data.sources import load_samples

    data = pre["data"]
    cfg = data if not isinstance(data, dict) else OmegaConf.create(data)
    where = pre.get("cache_dir") or cache_dir
    if not where:
        raise TransferError("model.pretrain.cache_dir is needed (e.g. ${paths.cache_dir})")
    return load_samples(cfg, where)


def pretrained_state(model_cfg: dict, samples: FlowSamples, train_idx: np.ndarray,
                     build_net, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Pretrain a fresh network on ``model_cfg["pretrain"]``'s data for one fold.

    ``build_net(num_classes, pretrain_samples)`` makes the network (and provides its named
    inputs for those samples). The pretraining data is ``samples.pretrain`` (loaded by the
    runner) or loaded here once and kept there. Returns (state dict, info): ``n`` clips,
    ``subjects`` used, ``excluded_subjects`` (the fold's held-out subjects found in the
    pretraining data), ``classes``, ``seconds``.
    """
    import lightning as L

    from mer.data.datamodule import SplitDataModule
    from mer.engine.losses import resolve_loss
    from mer.engine.module import MERModule

    pre = dict(model_cfg["pretrain"])
    check_config(pre)
    if pre.get("checkpoint"):
        return read_checkpoint(pre["checkpoint"]), {"checkpoint": str(pre["checkpoint"])}
    if samples.pretrain is None:
        samples.pretrain = load_pretrain_samples(pre)
    macro = samples.pretrain
    idx, excluded = pretraining_index(samples, train_idx, macro)
    if len(idx) == 0:
        raise TransferError(
            "model.pretrain: every pretraining clip belongs to a subject this fold holds out; "
            "add pretraining data of other subjects")
    t0 = time.perf_counter()
    net = build_net(macro.num_classes, macro)
    loss = resolve_loss(model_cfg.get("loss"), macro.labels[idx], macro.num_classes)
    module = MERModule(net, macro.num_classes, lr=float(pre.get("lr") or model_cfg["lr"]),
                       weight_decay=float(pre.get("weight_decay", model_cfg["weight_decay"])),
                       optimizer=model_cfg["optimizer"], class_names=macro.class_names,
                       loss=loss)
    dm = SplitDataModule(macro, idx, np.array([], dtype=np.int64),
                         batch_size=int(pre.get("batch_size") or 64), shuffle=True, seed=seed)
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "deterministic": True,
                      **(pre.get("trainer") or {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        L.Trainer(max_epochs=int(pre.get("epochs", 10)), logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False,
                  limit_val_batches=0, num_sanity_val_steps=0,
                  **trainer_kwargs).fit(module, datamodule=dm)
    info = {"n": int(len(idx)),
            "subjects": sorted(set(macro.meta["subject_key"].to_numpy()[idx])),
            "excluded_subjects": excluded, "classes": list(macro.class_names),
            "seconds": time.perf_counter() - t0}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, info
