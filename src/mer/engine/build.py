"""Build the LightningModule for a model config and a training split."""

from __future__ import annotations

import numpy as np
from torch import nn

from mer.data.inputs import InputError, InputRequest, describe, provide
from mer.data.samples import FlowSamples
from mer.engine.module import MERModule
from mer.models.registry import create_model


def model_inputs(net: nn.Module) -> tuple[str, ...]:
    """What a network consumes (its class attribute ``inputs``; ``("flow",)`` by default)."""
    return tuple(getattr(net, "inputs", ("flow",)))


def provide_inputs(net: nn.Module, samples: FlowSamples) -> None:
    """Check that ``samples`` suit ``net`` and put the named inputs it declares
    (``net.input_spec()``) into ``samples.inputs``, in the order of ``net.input_names``.

    Raises:
        InputError: the flow image has another size than the network takes
            (``net.flow_size``), or an input cannot be made (no frames, too few frames...);
            the message names the sample and the fix.
    """
    size = getattr(net, "flow_size", None)
    if "flow" in model_inputs(net) and size and len(samples.x) and samples.x.shape[-1] != size:
        first = samples.meta.iloc[0].to_dict()
        raise InputError(
            f"{describe(first)}: {type(net).__name__} takes {size}x{size} flow images "
            f"(model.kwargs.flow_size={size}) but the samples' flow is "
            f"{'x'.join(map(str, samples.x.shape[1:]))}: set data.flow.out_size={size}, or "
            f"model.kwargs.flow_size={samples.x.shape[-1]}")
    spec = net.input_spec() if hasattr(net, "input_spec") else {}
    names = tuple(getattr(net, "input_names", ()) or ())
    if set(spec) != set(names):
        raise InputError(f"{type(net).__name__}: input_names {list(names)} and input_spec "
                         f"{sorted(spec)} disagree")
    provide(samples, [InputRequest(n, int(spec[n]["size"]), int(spec[n].get("length", 0)))
                      for n in names])


def prepare_inputs(model_cfg: dict, samples: FlowSamples) -> None:
    """Before any fold or client is trained: load ``model_cfg["pretrain"]``'s data into
    ``samples.pretrain`` and provide the network's named inputs for both (once, in this
    process, so that forked fold workers share them)."""
    from mer.models.registry import MODELS, list_models

    kwargs = model_cfg.get("kwargs") or {}
    pre = model_cfg.get("pretrain")
    if model_cfg["name"] in list_models() and not pre and \
            not getattr(MODELS[model_cfg["name"]], "input_names", ()):
        return  # the flow only: nothing to make (and no large network built for nothing)
    jobs = [samples]
    if pre:
        from mer.engine.transfer import check_config, load_pretrain_samples

        check_config(dict(pre))
        if pre.get("data") and samples.pretrain is None:
            samples.pretrain = load_pretrain_samples(dict(pre))
        if samples.pretrain is not None:
            jobs.append(samples.pretrain)
    for data in jobs:
        net = create_model(model_cfg["name"], num_classes=data.num_classes,
                           in_channels=data.x.shape[1], **kwargs)
        provide_inputs(net, data)


def build_module(model_cfg: dict, samples: FlowSamples, train_idx: np.ndarray,
                 prior_counts: np.ndarray | None = None) -> MERModule:
    """A fresh module for ``model_cfg`` (name, lr, weight_decay, optimizer, kwargs, loss, prior,
    pretrain).

    The network's named inputs (face crops, frame stacks, magnified flow) are provided into
    ``samples.inputs`` (:func:`provide_inputs`). Networks that predict AUs (``net.uses_aus``)
    get an :class:`AUMERModule`, and their data prior is counted from the AU annotations of
    ``train_idx`` only: never from test samples. ``prior_counts`` (12, 12): those counts, summed
    elsewhere (a federation's server adds the labs' counts without their annotations). Other
    networks get a :class:`MERModule` with ``model_cfg["loss"]`` (``mer.engine.losses``;
    ``alpha: balanced`` from the labels of ``train_idx``).

    ``model_cfg["pretrain"]`` (``mer.engine.transfer``): when ``train_idx`` is not empty, the
    network is first pretrained on that data without the subjects outside ``train_idx`` and its
    weights handed over (the head re-initialised when the classes differ); the module's
    ``transfer`` attribute records what was used. (A federated run's clients rebuild their
    module with an empty ``train_idx`` and load the global weights: only the server's template
    is pretrained.)
    """
    kwargs = model_cfg.get("kwargs") or {}

    def make(num_classes: int, data: FlowSamples) -> nn.Module:
        net = create_model(model_cfg["name"], num_classes=num_classes,
                           in_channels=data.x.shape[1], **kwargs)
        provide_inputs(net, data)
        return net

    net = make(samples.num_classes, samples)
    common = dict(lr=model_cfg["lr"], weight_decay=model_cfg["weight_decay"],
                  optimizer=model_cfg["optimizer"], class_names=samples.class_names)
    if not getattr(net, "uses_aus", False):
        from mer.engine.losses import resolve_loss

        train_idx = np.asarray(train_idx, dtype=np.int64)
        loss = resolve_loss(model_cfg.get("loss"), samples.labels[train_idx],
                            samples.num_classes)
        module = MERModule(net, samples.num_classes, loss=loss, **common)
        if model_cfg.get("pretrain") and len(train_idx):
            _pretrain(module, model_cfg, samples, train_idx, make)
        return module
    if model_cfg.get("pretrain"):
        raise ValueError(f"model.pretrain: {model_cfg['name']} trains with AU targets; "
                         "pretraining is offered for emotion-only networks")
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


def _pretrain(module: MERModule, model_cfg: dict, samples: FlowSamples,
              train_idx: np.ndarray, make) -> None:
    import torch

    from mer.engine.transfer import pretrained_state, transfer_state

    rng_state = torch.get_rng_state()  # fine-tuning starts from the same random state
    state, info = pretrained_state(model_cfg, samples, train_idx, make)
    torch.set_rng_state(rng_state)
    same = info.get("classes", samples.class_names) == list(samples.class_names)
    source = (f"pretraining checkpoint {info['checkpoint']}" if "checkpoint" in info else
              f"the pretrained {model_cfg['name']} ({info['n']} clips)")
    info["transfer"] = transfer_state(module.net, state, source, same_classes=same)
    module.transfer = info


def uses_aus(module: MERModule) -> bool:
    """True when the module's batches must carry AU targets and masks."""
    return bool(getattr(module.net, "uses_aus", False))
