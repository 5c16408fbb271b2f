"""Config validation in one place: every key of ``conf/`` with its range or choices, and the
rules between keys, checked before any data is generated or loaded.

:func:`check_config` raises one :class:`ConfigError` listing every problem at once, each
naming the full key, the value, what is allowed and how to fix it::

    federated.faults.dropout=1.5: must be a number in [0, 1) (the probability that a
    selected client drops out of a round; 1 would train nothing); e.g. federated.faults.dropout=0.2

The table :data:`RULES` maps a dotted key (``*`` matches one level, a dict key or a list
position) to a :class:`Check`; keys a config does not have are skipped (the code's defaults
apply). Choices that the code defines (models, databases, flow methods, attacks, server
optimisers, rules) are read from the code, so the two cannot drift. The rules between keys
are the ``_cross_*`` functions. What is known only once the clients exist (their number and
names) is checked by :func:`check_clients`, called where the clients are made.

Called at the start of ``mer.run``, ``mer.prepare`` and wherever the Flower apps compose a
config; ``mer.run`` prints the error and exits with status 2 (:func:`check_or_exit`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# The check kinds and shared ranges live in mer.config_rules (no import circle with the
# packages' own checks); imported here so that ``from mer.config_check import Int`` works.
from mer.config_rules import (  # noqa: F401 (re-exported)
    COUNT,
    DROPOUT,
    LR,
    POS_INT,
    SIZE,
    WORKERS_AUTO,
    Bool,
    Check,
    ConfigError,
    Either,
    Int,
    ListOf,
    Mapping,
    Num,
    OneOf,
    Prob,
    Rule,
    Text,
    _fmt,
    _is_int,
    _is_num,
    problem_text,
)
from mer.paths import CONF_DIR
from mer.privacy.checks import CKKS_RULES, DP_RULES

CONF = CONF_DIR




# -- choices read from the code (imported only when a config is checked) --------------------


def _databases() -> list[str]:
    from mer.data.databases.registry import DATABASES

    return sorted(DATABASES)


def _data_kinds() -> list[str]:
    return ["synme", "synme_lv", "flowcache", "composite", *_databases()]


def _long_video_databases() -> list[str]:
    from mer.data.databases.registry import LONG_VIDEO

    return sorted(LONG_VIDEO)


def _presets() -> list[str]:
    from mer.data.synthetic import PRESETS

    return list(PRESETS)


def _flow_methods() -> list[str]:
    from mer.data.preprocess.flow import METHODS

    return list(METHODS)


def _models() -> list[str]:
    from mer.models.registry import list_models

    return list_models()


def _rules() -> list[str]:
    from mer.federated.rules import RULES

    return RULES.names()


def _server_optimizers() -> list[str]:
    from mer.federated.server_opt import OPTIMIZERS

    return sorted(OPTIMIZERS)


def _attacks() -> list[str]:
    from mer.federated.faults import ATTACKS, DATA_ATTACKS

    return sorted(ATTACKS) + list(DATA_ATTACKS)


def _label_schemes() -> list[str]:
    from mer.data.labels import LABEL_SCHEMES

    return LABEL_SCHEMES.names()


def _privacy_names() -> list[str]:
    from mer.privacy import PRIVACY_MODES

    return PRIVACY_MODES.names()


PARTITIONS = ("natural", "iid", "dirichlet", "quantity")
SELECT = ("last", "val_uf1", "val_loss")

RULES: tuple[Rule, ...] = (
    # -- root
    Rule("name", Text()),
    Rule("seed", Int(0), "seeds numpy's generators, which take no negative seed"),
    Rule("resume", Bool()),
    Rule("fidelity", OneOf(choices=("mer", "official")),
         "official: FED-PsyAU as its authors' code does it (README fidelity table)"),
    Rule("progress", Bool()),
    # -- data
    Rule("data.name", Text()),
    Rule("data.kind", OneOf(choices=_data_kinds)),
    Rule("data.preset", OneOf(choices=_presets)),
    Rule("data.seed", Int(0)),
    Rule("data.families.*", OneOf(choices=_databases),
         "the real database a synthetic one imitates (its label exclusions)"),
    Rule("data.roots", Mapping()),
    Rule("data.label_scheme", Either(options=(OneOf(choices=_label_schemes), Mapping())),
         "a scheme name or an {emotion: class} mapping"),
    Rule("data.flow.method", OneOf(choices=_flow_methods)),
    Rule("data.flow.work_size", Int(8), "frames are resized to this side before the flow"),
    Rule("data.flow.out_size", Int(2), "side of the flow image"),
    Rule("data.batch_size", SIZE),
    Rule("data.shuffle", Bool()),
    Rule("data.workers", Int(0, words=("auto",)),
         "processes for generation and flow; 0: in this process"),
    Rule("data.on_error", OneOf(choices=("raise", "skip"))),
    Rule("data.on_unmatched", OneOf(choices=("raise", "mask")),
         "flow cache clips without a row in data.sheets"),
    Rule("data.prepared", Either(options=(OneOf(choices=("auto",)), Bool()))),
    Rule("data.face.detector", OneOf(choices=("mediapipe", "none"))),
    Rule("data.face.min_confidence", Prob()),
    Rule("data.face.margin", Num(lo=0, eg=0.1), "crop border, a fraction of the face box"),
    Rule("data.apex.method", OneOf(choices=_flow_methods)),
    Rule("data.magnify.enabled", Bool()),
    Rule("data.magnify.alpha", Num(lo=0, open_lo=True, eg=8.0)),
    Rule("data.magnify.low_hz", Num(lo=0, eg=1.0)),
    Rule("data.magnify.high_hz", Num(lo=0, open_lo=True, eg=15.0)),
    Rule("data.magnify.levels", POS_INT),
    Rule("data.magnify.skip_levels", COUNT),
    Rule("data.class_names", ListOf(item=Text(), min_len=2)),
    Rule("data.databases", ListOf(item=OneOf(choices=_long_video_databases), min_len=1),
         "SynME-LV's long-video sets"),
    Rule("data.longvideo.detector", OneOf(choices=("synthetic", "mediapipe"))),
    Rule("data.longvideo.min_confidence", Prob()),
    Rule("data.longvideo.margin", Num(lo=0, eg=0.15)),
    Rule("data.longvideo.size", Int(16), "side of the aligned grey crop"),
    Rule("data.longvideo.crop_size", Int(2)),
    Rule("data.longvideo.k_seconds", Num(lo=0, open_lo=True, eg=0.2)),
    Rule("data.longvideo.flow.method", OneOf(choices=_flow_methods)),
    Rule("data.longvideo.redetect_seconds", Num(lo=0, open_lo=True, eg=1.0)),
    Rule("data.longvideo.track_error_px", Num(lo=0, open_lo=True, eg=1.0)),
    Rule("data.longvideo.chunk_frames", POS_INT),
    Rule("data.longvideo.flow.finest_scale", Int(0)),
    # -- model
    Rule("model.name", OneOf(choices=_models)),
    Rule("model.lr", LR),
    Rule("model.weight_decay", Num(lo=0, eg=1e-4)),
    Rule("model.optimizer", OneOf(choices=("adam", "adamw", "sgd"))),
    Rule("model.kwargs.dropout", DROPOUT),
    Rule("model.kwargs.input_size", SIZE),
    Rule("model.kwargs.resize", Int(1, null=True)),
    Rule("model.kwargs.node_dim", SIZE),
    Rule("model.kwargs.heads", SIZE),
    Rule("model.kwargs.prior_beta", Prob()),
    Rule("model.kwargs.prior_ratio", Prob()),
    Rule("model.kwargs.patch_size", SIZE),
    Rule("model.kwargs.dim", SIZE),
    Rule("model.kwargs.block_repeats", ListOf(item=POS_INT, min_len=1)),
    Rule("model.kwargs.mlp_mult", SIZE),
    Rule("model.kwargs.hidden", SIZE),
    Rule("model.kwargs.feature_dim", SIZE),
    Rule("model.kwargs.backbone_kwargs.dropout", DROPOUT),
    Rule("model.kwargs.size", OneOf(choices=("small", "published"))),
    Rule("model.kwargs.flow_size", SIZE, "= data.flow.out_size"),
    Rule("model.kwargs.drop_key", DROPOUT, "DropKey rate on the attention logits"),
    Rule("model.kwargs.saliency_scale", Num(lo=0, eg=2.0)),
    Rule("model.kwargs.stage1_fraction", Prob(open_lo=True, open_hi=True, eg=0.5),
         "share of the steps of training stage 1"),
    Rule("model.kwargs.frames", Int(2, null=True)),
    Rule("model.kwargs.image_size", Int(8, null=True)),
    Rule("model.loss.kind", OneOf(choices=("ce", "focal"))),
    Rule("model.loss.gamma", Num(lo=0, eg=2.0), "focal loss focusing"),
    Rule("model.pretrain.epochs", POS_INT),
    Rule("model.pretrain.batch_size", SIZE),
    Rule("model.loss.w_emotion", Num(lo=0, eg=0.2)),
    Rule("model.loss.w_au", Num(lo=0, eg=0.8)),
    Rule("model.prior.schedule", OneOf(choices=("decay", "fixed", "official"))),
    Rule("model.kwargs.fidelity", OneOf(choices=("mer", "official"))),
    Rule("model.kwargs.freeze_au", Bool(null=True)),
    Rule("model.prior.ratio", Prob()),
    # -- protocol
    Rule("protocol.name", OneOf(choices=("loso", "cross_db", "lodo"))),
    Rule("protocol.train", ListOf(item=Text(), min_len=1, null=True),
         "databases to train on (protocol=cross_db)"),
    Rule("protocol.test", ListOf(item=Text(), min_len=1, null=True),
         "databases to test on (protocol=cross_db)"),
    Rule("protocol.select", OneOf(choices=SELECT)),
    Rule("protocol.val_subjects", Either(options=(Prob(open_hi=True), Int(1))),
         "0: none; a fraction in (0, 1) or a count >= 1 of the training subjects"),
    Rule("protocol.workers", WORKERS_AUTO, "fold worker processes"),
    Rule("protocol.fold_index", Either(options=(Int(0), ListOf(item=Int(0), min_len=1)),
                                       null=True)),
    # -- trainer (lightning.Trainer's keyword arguments)
    Rule("trainer.max_epochs", POS_INT, "-1 would train for ever, 0 not at all"),
    Rule("trainer.min_epochs", COUNT),
    Rule("trainer.max_steps", Int(-1), "-1: no limit"),
    Rule("trainer.accelerator", OneOf(choices=("cpu", "gpu", "cuda", "mps", "tpu", "auto"))),
    Rule("trainer.devices", Either(options=(POS_INT, ListOf(item=COUNT, min_len=1)),
                                   words=("auto",))),
    Rule("trainer.deterministic", Either(options=(Bool(), OneOf(choices=("warn",))))),
    Rule("trainer.log_every_n_steps", POS_INT),
    # -- logger
    Rule("logger.wandb.project", Text()),
    Rule("logger.wandb.mode", OneOf(choices=("offline", "online", "disabled"))),
    Rule("logger.wandb.tags", ListOf(item=Text())),
    # -- federated
    Rule("federated.name", Text()),
    Rule("federated.rule.name", OneOf(choices=_rules)),
    Rule("federated.rule.beta", Num(lo=0, hi=0.5, open_hi=True, eg=0.2),
         "the share trimmed at each end"),
    Rule("federated.rule.num_malicious", COUNT),
    Rule("federated.rule.num_to_keep", POS_INT),
    Rule("federated.mu", Num(lo=0, eg=0.01), "FedProx proximal weight"),
    Rule("federated.mu_per_database", Mapping(null=True)),
    Rule("federated.mu_per_database.*", Num(lo=0, eg=0.01),
         "proximal weight of a database family (fidelity=official)"),
    Rule("federated.prox_norm", OneOf(choices=("squared", "l2"), null=True)),
    Rule("federated.prox_anchor", OneOf(choices=("global", "initial"), null=True)),
    Rule("federated.personalise.mix_buffers", Bool(null=True)),
    Rule("federated.client_optimizer", Mapping(null=True)),
    Rule("federated.client_optimizer.name", OneOf(choices=("adam", "adamw", "sgd"))),
    Rule("federated.client_optimizer.momentum", Prob(open_hi=True, null=True, eg=0.0)),
    Rule("federated.client_optimizer.lr", Num(lo=0, open_lo=True, null=True, eg=0.01),
         "null: model.lr"),
    Rule("federated.personalise.own", Prob()),
    Rule("federated.server_opt.name", OneOf(choices=_server_optimizers)),
    Rule("federated.server_opt.lr", LR),
    Rule("federated.server_opt.momentum", Prob(open_hi=True, eg=0.9)),
    Rule("federated.server_opt.eta", LR),
    Rule("federated.server_opt.beta_1", Prob(open_hi=True, eg=0.9)),
    Rule("federated.server_opt.beta_2", Prob(open_hi=True, eg=0.99)),
    Rule("federated.server_opt.tau", Num(lo=0, open_lo=True, eg=1e-3),
         "keeps the adaptive step finite"),
    Rule("federated.server_opt.bias_correction", OneOf(choices=("flower", "adam", "none"))),
    Rule("federated.rounds", POS_INT, "0 rounds would score an untrained model"),
    Rule("federated.local_epochs", POS_INT, "0 would train nothing"),
    Rule("federated.fraction", Prob(open_lo=True, eg=1.0), "share of clients sampled per round"),
    Rule("federated.min_clients", POS_INT),
    Rule("federated.eval_every", POS_INT),
    Rule("federated.workers", POS_INT, "processes training clients at once"),
    Rule("federated.reuse_clients", Bool(), "one module per client across rounds"),
    Rule("federated.num_clients", Int(1, null=True)),
    Rule("federated.partition.kind", OneOf(choices=PARTITIONS)),
    Rule("federated.partition.alpha", Num(lo=0, open_lo=True, eg=0.5), "Dirichlet concentration"),
    Rule("federated.partition.test_fraction", Prob(open_lo=True, open_hi=True, eg=0.3),
         "each client's share of test subjects"),
    Rule("federated.protocol.kind", OneOf(choices=("holdout", "loso"))),
    Rule("federated.protocol.repeats", POS_INT),
    Rule("federated.protocol.workers", WORKERS_AUTO, "federated LOSO folds trained at once"),
    Rule("federated.baselines", Bool()),
    Rule("federated.baseline_epochs", Int(1, null=True)),
    Rule("federated.faults.dropout", Prob(open_hi=True, eg=0.2),
         "the probability that a selected client drops out of a round; 1 would train nothing"),
    Rule("federated.faults.stragglers.probability", Prob()),
    Rule("federated.faults.stragglers.work", Prob(open_lo=True, eg=0.5),
         "the share of its local steps a straggler does"),
    Rule("federated.faults.deadline_s", Num(lo=0, open_lo=True, null=True, eg=30)),
    Rule("federated.faults.crash", ListOf(item=Mapping())),
    Rule("federated.faults.crash.*.client", Text()),
    Rule("federated.faults.crash.*.round", POS_INT),
    Rule("federated.faults.byzantine.clients", ListOf(item=Text())),
    Rule("federated.faults.byzantine.attack", OneOf(choices=_attacks)),
    Rule("federated.faults.byzantine.scale", Num(lo=0, eg=10.0)),
    Rule("federated.faults.byzantine.sigma", Num(lo=0, eg=1.0)),
    # -- privacy (each option's own keys; a key another option lacks is simply absent)
    Rule("privacy.name", OneOf(choices=_privacy_names)),
    Rule("privacy.noise_multiplier", Num(lo=0, eg=1.0), "sigma"),
    Rule("privacy.max_grad_norm", Num(lo=0, open_lo=True, eg=1.0), "per-sample clipping norm"),
    Rule("privacy.clip_norm", Num(lo=0, open_lo=True, eg=1.0), "clipping norm of an update"),
    Rule("privacy.target_epsilon", Num(lo=0, open_lo=True, null=True, eg=8.0)),
    Rule("privacy.delta", Prob(open_lo=True, open_hi=True, eg=1e-5)),
    Rule("privacy.accountant", OneOf(choices=("rdp", "prv"))),
    Rule("privacy.sample_rate", Prob(open_lo=True, null=True, eg=0.1)),
    Rule("privacy.secure_mode", Bool()),
    *DP_RULES,
    *CKKS_RULES,
    Rule("privacy.chunk_size", COUNT, "values per CKKS vector; 0: the whole model"),
    Rule("privacy.symmetric", Bool()),
    Rule("privacy.n_threads", COUNT, "0: TenSEAL's default"),
    Rule("privacy.secret_context", Text(null=True)),
    Rule("privacy.public_context", Text(null=True)),
    Rule("privacy.mask_bits", Int(8, 64)),
    Rule("privacy.frac_bits", Int(0, 62)),
    Rule("privacy.min_clients", Int(2), "a sum of one lab would be its update"),
    Rule("privacy.disclose_per_lab", Bool(), "each lab's own confusion matrix to the server"),
    Rule("privacy.threshold", Int(2, null=True)),
    # -- privacy audit
    Rule("audit.rounds", POS_INT),
    Rule("audit.dp_curve", Text(null=True), "run directory of a +experiment=dp_curve run"),
    Rule("audit.inversion.samples", POS_INT),
    Rule("audit.inversion.steps", POS_INT),
    Rule("audit.settings", ListOf(item=Mapping(), min_len=1)),
    Rule("audit.settings.*.name", Text()),
    Rule("audit.settings.*.privacy", OneOf(choices=_privacy_names)),
    # -- DP operating-point curve (mer.experiments.dp_curve)
    Rule("dp_curve.full", Bool()),
    Rule("dp_curve.epsilons", ListOf(item=Num(lo=0, open_lo=True), min_len=1)),
    Rule("dp_curve.full_epsilons", ListOf(item=Num(lo=0, open_lo=True), min_len=1)),
    Rule("dp_curve.repeats", POS_INT),
    Rule("dp_curve.full_repeats", POS_INT),
    Rule("dp_curve.delta", Prob(open_lo=True, open_hi=True, eg=1e-5)),
    Rule("dp_curve.test_fraction", Prob(open_lo=True, open_hi=True, eg=0.3)),
    Rule("dp_curve.target_fraction", Prob(open_lo=True, eg=0.9)),
    Rule("dp_curve.target_epsilon", Num(lo=0, open_lo=True, eg=10)),
    Rule("dp_curve.public.seed", Int(0)),
    Rule("dp_curve.extractor.model", OneOf(choices=_models)),
    Rule("dp_curve.extractor.feature_dim", SIZE),
    Rule("dp_curve.extractor.epochs", POS_INT),
    Rule("dp_curve.extractor.lr", LR),
    Rule("dp_curve.extractor.batch_size", SIZE),
    Rule("dp_curve.extractor.kwargs.dropout", DROPOUT),
    Rule("dp_curve.reference_end_to_end", Bool()),
    Rule("dp_curve.threads", POS_INT, "torch threads"),
    Rule("dp_curve.settings.*.clients", OneOf(choices=("labs", "pooled", "sites"))),
    Rule("dp_curve.settings.*.rounds", POS_INT),
    Rule("dp_curve.settings.*.local_steps", POS_INT),
    Rule("dp_curve.settings.*.batch_size", SIZE),
    Rule("dp_curve.settings.*.lr", LR),
    Rule("dp_curve.settings.*.momentum", Prob(open_hi=True, eg=0.9)),
    Rule("dp_curve.settings.*.clip", Num(lo=0, open_lo=True, eg=1.0)),
    Rule("dp_curve.settings.*.num_sites", Int(2)),
    Rule("dp_curve.settings.*.server_lr", LR),
    Rule("dp_curve.settings.*.server_momentum", Prob(open_hi=True, eg=0.9)),
    # -- hydra/launcher (submitit; checked when the hydra node is given)
    Rule("hydra.launcher.timeout_min", POS_INT),
    Rule("hydra.launcher.cpus_per_task", Int(1, null=True), "null: submitit's default"),
    Rule("hydra.launcher.gpus_per_node", Int(0, null=True), "null: submitit's default"),
    Rule("hydra.launcher.tasks_per_node", POS_INT),
    Rule("hydra.launcher.nodes", POS_INT),
    Rule("hydra.launcher.mem_gb", Num(lo=0, open_lo=True, null=True, eg=32)),
    Rule("hydra.launcher.array_parallelism", POS_INT),
    Rule("hydra.launcher.max_num_timeout", COUNT),
    Rule("hydra.launcher.signal_delay_s", COUNT),
)
# a data config inside another key (a pretraining set) has the same rules as ``data``
DATA_ELSEWHERE = ("model.pretrain.data",)
RULES = RULES + tuple(Rule(f"{where}.{r.key[len('data.'):]}", r.check, r.note)
                      for where in DATA_ELSEWHERE for r in RULES if r.key.startswith("data."))
from mer.privacy.stickers.checks import RULES as _STICKER_RULES  # noqa: E402 (the same)
from mer.spotting.checks import RULES as _SPOTTING_RULES  # noqa: E402 (needs the names above)

RULES = RULES + _SPOTTING_RULES + _STICKER_RULES
from mer.data.generate.checks import RULES as _GENERATE_RULES  # noqa: E402
from mer.data.generate.checks import augment_problems  # noqa: E402

RULES = RULES + _GENERATE_RULES


# -- walking the config -----------------------------------------------------------------------


def _expand(node: Any, parts: list[str], prefix: str) -> Iterator[tuple[str, Any]]:
    """(full key, value) of every entry of ``node`` matching the dotted ``parts``."""
    if not parts:
        yield prefix, node
        return
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
        for k in keys:
            yield from _expand(node[k], rest, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list) and head == "*":
        for i, item in enumerate(node):
            yield from _expand(item, rest, f"{prefix}[{i}]")


def find(tree: dict, pattern: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every entry of the plain ``tree`` that ``pattern`` names."""
    return _expand(tree, pattern.split("."), "")


_problem = problem_text


def _plain(cfg: Any) -> tuple[dict, list[str]]:
    """The config as plain containers (interpolations resolved), and resolution problems."""
    if isinstance(cfg, dict):
        return cfg, []
    problems = []
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    for key in list(tree):
        try:
            node = cfg[key]
            tree[key] = OmegaConf.to_container(node, resolve=True) \
                if isinstance(node, DictConfig | ListConfig) else node
        except Exception as e:  # an interpolation that cannot be resolved (${oc.env:...})
            problems.append(f"{key}: cannot be resolved ({e}); set the variable or the key")
    return tree, problems


def _launcher(cfg: Any) -> dict | None:
    """``hydra.launcher`` as a plain dict (values that do not resolve are left out)."""
    node = None
    if isinstance(cfg, DictConfig) and "hydra" in cfg:
        node = cfg.hydra.get("launcher")
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                node = HydraConfig.get().get("launcher")
        except Exception:  # no Hydra run: nothing to check
            node = None
    if node is None:
        return None
    out = {}
    for k in node:
        try:
            value = node[k]
        except Exception:  # ${hydra.sweep.dir} and the like, outside a run
            continue
        out[k] = OmegaConf.to_container(value, resolve=False) \
            if isinstance(value, DictConfig | ListConfig) else value
    return out


# -- the checks ---------------------------------------------------------------------------------


def table_problems(tree: dict, rules: Sequence[Rule] = RULES, prefix: str = "",
                   strip: str = "") -> list[str]:
    """Problems of ``tree`` against ``rules``; keys shown with ``prefix`` in place of ``strip``
    (to check e.g. an audit setting's privacy block under its own key)."""
    problems = []
    for rule in rules:
        if strip and not rule.key.startswith(strip):
            continue
        pattern = rule.key[len(strip):] if strip else rule.key
        for key, value in find(tree, pattern):
            if not rule.check.ok(value):
                problems.append(_problem(prefix + key, value, rule.check, rule.note))
    return problems


def _get(tree: dict, key: str, default: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _signature_keys(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "num_classes", "in_channels")
            and params[p].kind not in (inspect.Parameter.VAR_KEYWORD,
                                       inspect.Parameter.VAR_POSITIONAL)]


def _cross_model(tree: dict) -> list[str]:
    problems = []
    model = tree.get("model") or {}
    name, kwargs = model.get("name"), model.get("kwargs") or {}
    if isinstance(name, str) and name in _models() and isinstance(kwargs, dict):
        from mer.models.registry import MODELS

        allowed = _signature_keys(MODELS[name])
        for k in sorted(set(kwargs) - set(allowed)):
            problems.append(f"model.kwargs.{k}: not a parameter of model {name} "
                            f"({MODELS[name].__name__}); its parameters are {allowed}. Remove "
                            f"it (~model.kwargs.{k}) or choose the model whose key it is")
    loss = model.get("loss") or {}
    if isinstance(loss, dict) and _is_num(loss.get("w_emotion", 0.2)) and \
            _is_num(loss.get("w_au", 0.8)) and loss.get("w_emotion", 0.2) + \
            loss.get("w_au", 0.8) <= 0:
        problems.append("model.loss.w_emotion + model.loss.w_au = 0: nothing would be learnt; "
                        "give one a weight > 0 (e.g. model.loss.w_emotion=0.2)")
    return problems


def _cross_data(tree: dict) -> list[str]:
    problems = []
    data = tree.get("data") or {}
    mag = data.get("magnify") or {}
    lo, hi = mag.get("low_hz"), mag.get("high_hz")
    if _is_num(lo) and _is_num(hi) and lo >= hi:
        problems.append(f"data.magnify.low_hz={lo} >= data.magnify.high_hz={hi}: the pass band "
                        "is empty; make low_hz < high_hz (e.g. 1.0 and 15.0)")
    levels, skip = mag.get("levels"), mag.get("skip_levels")
    if _is_int(levels) and _is_int(skip) and skip >= levels:
        problems.append(f"data.magnify.skip_levels={skip} >= data.magnify.levels={levels}: no "
                        "level would be amplified; use skip_levels < levels (e.g. 1 of 4)")
    flow = data.get("flow") or {}
    work, out = flow.get("work_size"), flow.get("out_size")
    if data.get("prepared", False) is not False and data.get("kind") != "flowcache" and \
            _is_int(work) and _is_int(out) and out > work:
        problems.append(f"data.flow.out_size={out} > data.flow.work_size={work}: the prepared "
                        "pipeline crops at work_size and shrinks to out_size; make out_size <= "
                        "work_size")
    roots = data.get("roots")
    if data.get("kind") == "composite" and isinstance(roots, dict):
        for k in sorted(set(roots) - set(_databases())):
            problems.append(f"data.roots.{k}: not a database; use one of {_databases()}")
    return problems


def _cross_protocol(tree: dict) -> list[str]:
    problems = []
    protocol, federated = tree.get("protocol") or {}, tree.get("federated")
    select, val = protocol.get("select", "last"), protocol.get("val_subjects", 0)
    if select not in SELECT:  # reported by the table
        return problems
    if select != "last" and not val:
        problems.append(f"protocol.select={select} needs validation subjects, but "
                        f"protocol.val_subjects={_fmt(val)}: set protocol.val_subjects (e.g. 0.2 "
                        "or 2) or protocol.select=last. Selecting on the test fold is not offered")
    folds = protocol.get("fold_index")
    subjects = known_subjects(tree.get("data") or {})
    if subjects and not federated and folds is not None and \
            protocol.get("name", "loso") == "loso":  # cross_db / lodo: checked by make_folds
        total = sum(subjects.values())
        for i in [folds] if not isinstance(folds, list) else folds:
            if _is_int(i) and i >= total:
                problems.append(f"protocol.fold_index={i}: LOSO over {total} subjects "
                                f"({subjects}) has folds 0..{total - 1}; pick one of them")
    if federated:
        if select != "last":
            problems.append(f"protocol.select={select} is not used by federated runs (the last "
                            "round's model is scored): remove it (protocol.select=last)")
        if protocol.get("fold_index") is not None:
            problems.append(f"protocol.fold_index={_fmt(protocol['fold_index'])} is not used by "
                            "federated runs: remove it, or use federated.protocol.kind=loso")
    return problems


def known_subjects(data: dict) -> dict[str, int] | None:
    """Subjects per database when the config alone says (SynME's presets); else None."""
    if data.get("kind") != "synme":
        return None
    from mer.data import synthetic

    presets = synthetic.PRESETS
    if data.get("preset", "default") not in presets:
        return None
    return {s.name: int(s.n_subjects) for s in presets[data.get("preset", "default")]().databases}


def known_databases(data: dict) -> list[str] | None:
    """The databases a data config holds, when the config alone says (None: only the data
    does, e.g. a flow cache)."""
    kind = data.get("kind")
    if kind == "synme":
        subjects = known_subjects(data)
        return sorted(subjects) if subjects else None
    if kind == "composite":
        return sorted(data.get("roots") or {}) or None
    if kind in _databases():
        return [kind]
    return None


def known_clients(tree: dict) -> tuple[int, list[str] | None, str] | None:
    """(number of clients, their names when known, how that follows) from the config alone."""
    fed = tree.get("federated") or {}
    part = fed.get("partition") or {}
    n = fed.get("num_clients")
    if not (n is None or _is_int(n)):
        return None
    if part.get("kind", "natural") != "natural":
        k = n or 3
        return k, [f"client{i}" for i in range(k)], f"federated.num_clients={n or '3 (null)'}"
    dbs = known_databases(tree.get("data") or {})
    if dbs is None:
        return (n, None, f"federated.num_clients={n}") if n else None
    if n is None or n == len(dbs):
        return len(dbs), dbs, f"the natural partition: one client per database {dbs}"
    return n, None, f"federated.num_clients={n}"


def _client_problems(tree: dict, n: int, names: list[str] | None, how: str) -> list[str]:
    """What a federation of ``n`` clients (``names`` when known) cannot do with this config."""
    problems = []
    fed, privacy = tree.get("federated") or {}, tree.get("privacy") or {}
    more = (f"e.g. federated.num_clients={n + 1}: natural databases are split into "
            "subject-disjoint sites; or federated.partition.kind=iid")
    mc = fed.get("min_clients")
    if _is_int(mc) and mc > n:
        problems.append(f"federated.min_clients={mc} but the federation has {n} clients "
                        f"({how}): set federated.min_clients<={n}, or ask for more clients "
                        f"({more})")
    pm = privacy.get("min_clients")
    if _is_int(pm) and pm > n and privacy.get("name", "none") != "none":
        problems.append(f"privacy.min_clients={pm} but the federation has {n} clients ({how}): "
                        f"every round's protected sum would be withheld and nothing trained; "
                        f"set privacy.min_clients<={n} (>= 2), or ask for more clients ({more})")
    t = privacy.get("threshold")
    if _is_int(t) and t > n and privacy.get("name") == "secagg":
        problems.append(f"privacy.threshold={t} but the federation has {n} clients ({how}): no "
                        f"secret could be rebuilt; set privacy.threshold<={n} or null")
    rule = fed.get("rule") or {}
    f = rule.get("num_malicious")
    if rule.get("name") == "krum" and _is_int(f) and 2 * f >= n:
        problems.append(f"federated.rule.num_malicious={f} but the federation has {n} clients "
                        f"({how}): Krum needs a majority of honest clients (its guarantee even "
                        f"n >= 2f + 3); set federated.rule.num_malicious<={(n - 1) // 2}, or ask "
                        f"for more clients ({more})")
    keep = rule.get("num_to_keep")
    if rule.get("name") == "krum" and _is_int(keep) and keep > n:
        problems.append(f"federated.rule.num_to_keep={keep} but the federation has {n} clients "
                        f"({how}): Multi-Krum cannot keep more than it gets; set "
                        f"federated.rule.num_to_keep<={n}, or ask for more clients ({more})")
    if names is not None:
        faults = fed.get("faults") or {}
        byz = (faults.get("byzantine") or {}).get("clients") or []
        crash = faults.get("crash") or []
        for where, who in [("federated.faults.byzantine.clients", c) for c in byz] + \
                [(f"federated.faults.crash[{i}].client", (c or {}).get("client"))
                 for i, c in enumerate(crash) if isinstance(c, dict)]:
            if who is not None and str(who) not in names:
                problems.append(f"{where}: {who} is not a client; the clients are {names} "
                                f"({how})")
    return problems


def _cross_federated(tree: dict, whole_federation: bool = True) -> list[str]:
    fed = tree.get("federated")
    privacy = tree.get("privacy") or {}
    pname = privacy.get("name", "none")
    problems = []
    if not fed:
        if pname != "none":
            problems.append(f"privacy={pname} needs a federated run (e.g. federated=fedavg or "
                            "+experiment=fed_psyau); a centralised run would ignore it. Remove "
                            "privacy or add federated")
        if tree.get("audit"):
            problems.append("audit (the privacy audit) needs a federated config: add "
                            "federated=fedavg")
        return problems
    problems += _server_opt_keys(fed.get("server_opt"))
    rule = (fed.get("rule") or {}).get("name")
    from mer.federated.rules import RULES, rule_names

    if pname in ("ckks", "secagg", "central_dp") and isinstance(rule, str) and \
            rule in RULES and RULES.get(rule).needs_individual_updates:
        problems.append(f"federated.rule.name={rule} cannot run under privacy={pname}: the "
                        "server never sees an individual update there (robust rules and "
                        f"SCAFFOLD need them); use one of {list(rule_names(private=True))} "
                        "(P-FedProx is fedprox), or another privacy")
    from mer.federated.client_optim import scaffold_problem

    if (problem := scaffold_problem(fed)) is not None:
        problems.append(problem)
    if tree.get("fidelity") == "official" and pname in ("ckks", "secagg"):
        problems.append(f"fidelity=official cannot run under privacy={pname}: the FED-PsyAU "
                        "authors' code has no encryption, and its parameter-only P-FedProx mix "
                        "is not made from a protected sum; use fidelity=mer with "
                        f"privacy={pname}, or privacy=none")
    if pname == "dp" and rule == "scaffold":
        problems.append("federated.rule.name=scaffold cannot run under privacy=dp: its gradient "
                        "correction would bypass DP-SGD's clipping and noise; use fedavg or "
                        "fedprox")
    rounds = fed.get("rounds")
    for i, c in enumerate((fed.get("faults") or {}).get("crash") or []):
        r = c.get("round") if isinstance(c, dict) else None
        if _is_int(rounds) and _is_int(r) and r > rounds:
            problems.append(f"federated.faults.crash[{i}].round={r} is after the last round "
                            f"(federated.rounds={rounds}): the fault would never happen; use a "
                            f"round in 1..{rounds}")
    part = fed.get("partition") or {}
    n = fed.get("num_clients")
    dbs = known_databases(tree.get("data") or {})
    if part.get("kind", "natural") == "natural" and _is_int(n) and dbs and n < len(dbs):
        problems.append(f"federated.num_clients={n} but the natural partition has one client "
                        f"per database ({len(dbs)}: {dbs}); ask for at least {len(dbs)} or use "
                        "federated.partition.kind=iid|dirichlet|quantity")
    elif whole_federation and (known := known_clients(tree)) is not None:
        problems += _subject_problems(tree, known[0]) or _client_problems(tree, *known)
    return problems


def _subject_problems(tree: dict, n: int) -> list[str]:
    """``n`` clients need 2 subjects each (a subject-disjoint train/test split)."""
    subjects = known_subjects(tree.get("data") or {})
    fed = tree.get("federated") or {}
    if subjects is None or fed.get("num_clients") is None:
        return []
    natural = (fed.get("partition") or {}).get("kind", "natural") == "natural"
    most = sum(k // 2 for k in subjects.values()) if natural else sum(subjects.values()) // 2
    if n <= most:
        return []
    return [f"federated.num_clients={n} but {n} clients need 2 subjects each and the data has "
            f"{sum(subjects.values())} ({subjects}"
            f"{', split per database' if natural else ''}): ask for at most {most}"]


def _server_opt_keys(server_opt: Any) -> list[str]:
    if not isinstance(server_opt, dict) or server_opt.get("name") not in _server_optimizers():
        return []
    from mer.federated.server_opt import OPTIMIZERS, settings_of

    name = server_opt["name"]
    allowed = settings_of(name)
    return [f"federated.server_opt.{k}: not a setting of server optimiser {name} "
            f"({OPTIMIZERS[name].__name__}); its settings are {allowed}. Choose the optimiser "
            f"with federated/server_opt={name} (its own keys) or remove the key"
            for k in sorted(set(server_opt) - {"name"} - set(allowed))]


def _cross_privacy(tree: dict) -> list[str]:
    """Fixed-point masks and CKKS: the bits must leave room for the values."""
    problems = []
    p = tree.get("privacy") or {}
    if "min_survivors" in p:
        from mer.privacy import RENAMED_MIN_SURVIVORS

        problems.append(RENAMED_MIN_SURVIVORS.format(value=_fmt(p["min_survivors"])))
    mask, frac = p.get("mask_bits"), p.get("frac_bits")
    if _is_int(mask) and _is_int(frac) and frac > mask - 2:
        problems.append(f"privacy.frac_bits={frac} leaves no integer bits in "
                        f"privacy.mask_bits={mask} (|sum| < 2^(mask_bits - 1 - frac_bits) / K); "
                        f"use frac_bits <= {mask - 2}, e.g. 24 of 64")
    n, chunk = p.get("poly_modulus_degree"), p.get("chunk_size")
    if _is_int(n) and _is_int(chunk) and chunk > n // 2:
        problems.append(f"privacy.chunk_size={chunk} > {n // 2}, the slots of one ciphertext "
                        f"at privacy.poly_modulus_degree={n}: use chunk_size <= {n // 2} (0: "
                        "the whole model, split by TenSEAL)")
    bits, scale = p.get("coeff_mod_bit_sizes"), p.get("scale_bits")
    if isinstance(bits, list) and len(bits) >= 2 and all(_is_int(b) for b in bits) and \
            _is_int(scale) and sum(bits[:-1]) < scale + 2:
        problems.append(f"privacy.scale_bits={scale} leaves no room in the data primes "
                        f"{bits[:-1]} of privacy.coeff_mod_bit_sizes={bits} (|sum| < "
                        "2^(data bits - scale_bits - 1)); lower scale_bits or add a data prime")
    return problems


def _cross_audit(tree: dict) -> list[str]:
    """Each audit setting: a privacy option plus overrides of that option's own keys."""
    problems = []
    settings = _get(tree, "audit.settings")
    if not isinstance(settings, list):
        return problems
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or s.get("privacy") not in _privacy_names():
            continue
        base = OmegaConf.to_container(OmegaConf.load(CONF / "privacy" / f"{s['privacy']}.yaml"))
        over = {k: v for k, v in s.items() if k not in ("name", "privacy")}
        for k in sorted(set(over) - set(base)):
            problems.append(f"audit.settings[{i}].{k}: not a key of privacy={s['privacy']} "
                            f"(conf/privacy/{s['privacy']}.yaml has {sorted(base)}); remove it")
        merged = {**base, **{k: v for k, v in over.items() if k in base}}
        where = f"audit.settings[{i}]."
        problems += [p for p in table_problems(merged, prefix=where, strip="privacy.")
                     if p.split("=", 1)[0].removeprefix(where) in over]
    return problems


CROSS: tuple[Callable[[dict], list[str]], ...] = (
    _cross_data, _cross_model, _cross_protocol, _cross_privacy, _cross_audit,
    augment_problems,
)


def config_problems(cfg: DictConfig | dict, whole_federation: bool = True) -> list[str]:
    """Every problem of a composed config (empty: it is fine). ``whole_federation=False``: the
    config of one lab that may load only its own data (a Flower SuperNode): the checks of the
    federation's client count are the server's."""
    tree, problems = _plain(cfg)
    problems += table_problems(tree)
    for cross in CROSS:
        problems += cross(tree)
    problems += _cross_federated(tree, whole_federation)
    launcher = _launcher(cfg)
    if launcher:
        problems += table_problems({"hydra": {"launcher": launcher}})
    return problems


def check_config(cfg: DictConfig | dict, whole_federation: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``; return if there is none
    (``whole_federation``: see :func:`config_problems`)."""
    problems = config_problems(cfg, whole_federation)
    if problems:
        raise ConfigError(problems)


def check_or_exit(cfg: DictConfig | dict) -> None:
    """:func:`check_config` for entry points: the problems on stderr and exit status 2 (no
    traceback), before any data is generated or loaded."""
    try:
        check_config(cfg)
    except ConfigError as e:
        print(f"mer: {e}\nNothing was run: fix the values above and run again.",
              file=sys.stderr)
        raise SystemExit(2) from None


def check_clients(cfg: DictConfig | dict, names: Sequence[str], how: str) -> None:
    """Raise :class:`ConfigError` when the clients a partition made (``names``, made by
    ``how``) cannot serve the config (``federated.min_clients``, ``privacy.min_clients``, a
    Multi-Krum's ``num_to_keep``, faults naming unknown clients)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    problems = _client_problems(tree, len(names), list(names), how)
    if problems:
        raise ConfigError(problems)
