"""``+experiment=dp_curve``: UF1 against epsilon where DP can be useful, beside the non-private
figure of the same recipe (SYNTHETIC data: SynME).

Why plain DP-SGD fails here: STSTNet has ~1.7k parameters and a SynME lab ~50 training clips;
the noise norm of a DP-SGD step is sigma C sqrt(D) against a signal of at most (batch) C, so
with full-batch steps (q = 1, no amplification) the model stays at chance for any useful
epsilon. Three changes, each a setting of this curve:

1. **A small head over a frozen extractor** (:class:`mer.models.frozen_head.FrozenHead`): D
   drops from ~1.7k to F K + K (51 for F = 16, K = 3). The extractor is STSTNet with an
   F-dim bottleneck, trained non-privately on **public** data: a separate SynME draw
   (``dp_curve.public.seed``, another seed than ``data.seed``). Its subjects, faces, AU draws
   and clips come from other random streams, so it holds no person, clip or flow image of the
   private data (checked: no flow image in common); it shares only the generator, as a
   public database of other people shares the population. Only the head ever sees private
   data, and its DP guarantee covers everything private the released model depends on.
2. **Sample-level DP-SGD with Poisson subsampling** (:func:`mer.privacy.dp.dp_sgd`: Opacus'
   ``DPDataLoader``, per-sample clipping, the RDP accountant): q = batch / n < 1 amplifies
   privacy, and many noisy steps average out. ``clients: labs``: each lab of the natural
   partition runs it on its own clips (its own accountant; the reported epsilon is the
   largest over labs) and the server takes FedAvg; ``clients: pooled``: one data holder.
3. **User-level DP across many sites** (``clients: sites``): the labs' training subjects are
   dealt into ``num_sites`` subject-disjoint sites (mer's ``iid`` dealing), each site runs
   local SGD, the server clips each site's update to C, averages, adds N(0, (sigma C / K)^2)
   (:class:`mer.privacy.dp.CentralDP`, every site every round: q = 1, exact accounting):
   more sites, less noise per unit of signal. A site is one or two subjects, so the guarantee
   covers all clips of a subject.

Every epsilon is targeted by noise calibration (:func:`mer.privacy.dp.calibrate_noise`, at
``dp_curve.delta``) and reported as the accountant gives it after training. Evaluation is
honest: one subject-disjoint test set (the union of the labs' test subjects), the same for all
settings; fixed rounds and the final model, nothing selected on the test set; each point is
the mean (and std) over ``repeats`` noise seeds. The hyperparameters in
``conf/experiment/dp_curve.yaml`` were set on another SynME draw (``data.seed=2``).

Outputs in the run directory: ``dp_curve.json``, ``dp_curve.md`` (the table and the
signal-to-noise figures), ``dp_curve.png`` and ``extractor.pt`` (usable as
``model=frozen_head model.kwargs.extractor=...`` in any mer run).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from mer.data.samples import FlowSamples
from mer.engine.metrics import recognition_metrics
from mer.federated.aggregators import fedavg
from mer.federated.partition import check_partition, natural_clients
from mer.federated.server_opt import ServerSGD
from mer.models.frozen_head import FrozenHead, extractor_record, load_extractor_record
from mer.models.registry import create_model
from mer.privacy.base import Layout, flatten, unflatten
from mer.privacy.dp import (
    CentralDP,
    CentralDPConfig,
    ClientPrivacy,
    DPConfig,
    calibrate_noise,
    clip_update,
    dp_sgd,
)

log = logging.getLogger(__name__)
CLIENTS = ("labs", "pooled", "sites")
MECHANISMS = {"labs": "dp_sgd", "pooled": "dp_sgd", "sites": "central_dp"}


class DPCurveConfigError(ValueError):
    """A ``dp_curve`` config that cannot be run (the message names the key)."""


# --------------------------------------------------------------------------------------------
# data: the public draw, the private split
# --------------------------------------------------------------------------------------------


def public_data_config(cfg: DictConfig) -> DictConfig:
    """The data config of the public draw: ``cfg.data`` with ``dp_curve.public`` merged in.

    Raises:
        DPCurveConfigError: the public draw would be the private data (same seed).
    """
    public = OmegaConf.merge(cfg.data, cfg.dp_curve.public)
    if cfg.data.kind == "synme" and int(public.seed) == int(cfg.data.seed):
        raise DPCurveConfigError(
            f"dp_curve.public.seed={public.seed} equals data.seed: the public draw would be "
            "the private data. Set dp_curve.public.seed to another seed")
    return public


def check_disjoint(private: FlowSamples, public: FlowSamples) -> int:
    """Raise if a flow image of the public data is one of the private data; returns how many
    public images were checked."""
    def digests(x: np.ndarray) -> set[bytes]:
        return {hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest() for a in x}

    shared = digests(private.x) & digests(public.x)
    if shared:
        raise DPCurveConfigError(
            f"the public draw shares {len(shared)} flow image(s) with the private data; set "
            "dp_curve.public.seed to a seed no private draw uses")
    return len(public.x)


def deal_sites(samples: FlowSamples, train_idx: np.ndarray, num_sites: int,
               seed: int) -> list[np.ndarray]:
    """Training subjects shuffled (seeded) and dealt round-robin into ``num_sites``
    subject-disjoint sites (the ``iid`` kind of :mod:`mer.federated.partition`); returns each
    site's positions.

    Raises:
        DPCurveConfigError: more sites than training subjects.
    """
    keys = samples.meta["subject_key"].to_numpy()
    subjects = sorted(set(keys[train_idx]))
    if not 1 <= num_sites <= len(subjects):
        raise DPCurveConfigError(
            f"dp_curve: num_sites={num_sites}, but the training split has {len(subjects)} "
            f"subjects (a site holds whole subjects). Ask for 1..{len(subjects)} sites")
    order = np.random.default_rng([seed, 13]).permutation(subjects)
    return [train_idx[np.isin(keys[train_idx], order[j::num_sites])] for j in range(num_sites)]


# --------------------------------------------------------------------------------------------
# the public feature extractor
# --------------------------------------------------------------------------------------------


def pretrain_extractor(public: FlowSamples, ecfg: DictConfig, seed: int) -> dict:
    """Train ``ecfg.model`` (with ``num_classes = ecfg.feature_dim``) + Linear(F, K) on all
    public clips, non-privately (Adam, cross-entropy, fixed epochs); returns the extractor
    record (:func:`mer.models.frozen_head.extractor_record`) with the Linear(F, K) trained
    with it under ``"classifier"`` (on raw, unstandardised features)."""
    kwargs = OmegaConf.to_container(ecfg.get("kwargs") or {}, resolve=True)
    torch.manual_seed(seed)
    backbone = create_model(ecfg.model, num_classes=int(ecfg.feature_dim),
                            in_channels=public.x.shape[1], **kwargs)
    net = nn.Sequential(backbone, nn.Linear(int(ecfg.feature_dim), public.num_classes))
    x = torch.from_numpy(np.ascontiguousarray(public.x, dtype=np.float32))
    y = torch.as_tensor(public.labels.copy())
    opt = torch.optim.Adam(net.parameters(), lr=float(ecfg.lr))
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(int(ecfg.epochs)):
        for idx in torch.randperm(len(x), generator=gen).split(int(ecfg.batch_size)):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        feats = backbone(x)
    record = extractor_record(
        backbone, ecfg.model, kwargs, int(ecfg.feature_dim), feats.mean(0), feats.std(0),
        trained_on={"data": public.provenance.get("fingerprint", ""), "clips": len(x),
                    "synthetic": public.synthetic, "epochs": int(ecfg.epochs)})
    record["classifier"] = {k: v.detach().clone() for k, v in net[1].state_dict().items()}
    return record


def extractor_for(public: FlowSamples, ecfg: DictConfig, seed: int, cache_dir: Path) -> dict:
    """:func:`pretrain_extractor`, from ``cache_dir/dp_curve`` when these clips (by content)
    and this recipe were trained before (written atomically: a killed run leaves no partial
    file)."""
    digest = hashlib.sha256(np.ascontiguousarray(public.x).tobytes())
    digest.update(public.labels.tobytes())
    key = hashlib.sha256(json.dumps(
        [digest.hexdigest(), public.class_names, OmegaConf.to_container(ecfg, resolve=True),
         seed], sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "dp_curve" / f"extractor-{key}.pt"
    if path.exists():
        return load_extractor_record(path)
    record = pretrain_extractor(public, ecfg, seed)
    _atomic_save(record, path)
    return record


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# training a head (features precomputed: the extractor is frozen and in eval mode, so this is
# exactly FrozenHead.forward; tests check both give the same logits)
# --------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _weights(head: nn.Linear) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in head.state_dict().values()]


def _load(head: nn.Linear, weights: list[np.ndarray]) -> nn.Linear:
    head.load_state_dict({k: torch.from_numpy(np.asarray(w, np.float32))
                          for k, w in zip(head.state_dict(), weights)})
    return head


def _sgd(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
         batch_size: int | None, momentum: float, seed: int) -> None:
    """Non-private SGD on mean cross-entropy: minibatches of ``batch_size`` drawn without
    replacement (None: full batch)."""
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = slice(None) if batch_size is None or batch_size >= len(x) else \
            torch.randperm(len(x), generator=gen)[:batch_size]
        opt.zero_grad()
        F.cross_entropy(head(x[idx]), y[idx]).backward()
        opt.step()


def _padded(holders: list[tuple[str, np.ndarray]], feats: torch.Tensor, y: torch.Tensor,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every holder's features (S, M, F), one-hot labels (S, M, K) and mask (S, M), padded to
    the largest holder's M clips."""
    m = max(len(idx) for _, idx in holders)
    x = torch.zeros(len(holders), m, feats.shape[1])
    t = torch.zeros(len(holders), m, num_classes)
    mask = torch.zeros(len(holders), m)
    for j, (_, idx) in enumerate(holders):
        x[j, :len(idx)] = feats[idx]
        t[j, :len(idx)] = F.one_hot(y[idx], num_classes).float()
        mask[j, :len(idx)] = 1.0
    return x, t, mask


def local_gd(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
             mask: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` full-batch gradient steps on each holder's mean cross-entropy, all holders at
    once, from the same start (weight (K, F), bias (K,)); x (S, M, F), t (S, M, K) one-hot,
    mask (S, M). Returns each holder's weight (S, K, F) and bias (S, K). The gradient of a
    Linear softmax classifier in closed form: ``(softmax(x W^T + b) - t)^T x / n``."""
    w = weight.expand(len(x), *weight.shape).clone()
    b = bias.expand(len(x), *bias.shape).clone()
    n = mask.sum(1).clamp_min(1.0)
    for _ in range(steps):
        err = (torch.softmax(torch.einsum("smf,skf->smk", x, w) + b[:, None], -1) - t) \
            * mask[..., None] / n[:, None, None]
        w -= lr * torch.einsum("smk,smf->skf", err, x)
        b -= lr * err.sum(1)
    return w, b


def train_dp_sgd(s: DictConfig, holders: list[tuple[str, np.ndarray]], feats: torch.Tensor,
                 y: torch.Tensor, num_classes: int, epsilon: float | None, delta: float,
                 seed: int) -> tuple[nn.Linear, dict]:
    """FedAvg over ``holders`` (one: no federation) of local sample-level DP-SGD
    (``epsilon``: each holder's sigma calibrated to spend it in ``rounds * local_steps`` steps
    at q = batch / n); ``epsilon=None``: the same recipe with plain SGD (no clipping, no
    noise). Returns the head and ``{epsilon (largest over holders), sigma, q, steps,
    signal_norm, noise_norm}``."""
    head = nn.Linear(feats.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    steps = int(s.rounds) * int(s.local_steps)
    rates = [min(1.0, int(s.batch_size) / len(idx)) for _, idx in holders]
    privacies = None
    if epsilon is not None:
        privacies = [ClientPrivacy(name, DPConfig(delta=delta),
                                   noise_multiplier=calibrate_noise(epsilon, delta, q, steps))
                     for (name, _), q in zip(holders, rates)]
    signal, noise = [], []
    for rnd in range(int(s.rounds)):
        results = []
        for k, (_, idx) in enumerate(holders):
            local = copy.deepcopy(head)
            x, t = feats[idx], y[idx]
            if privacies is None:
                _sgd(local, x, t, int(s.local_steps), float(s.lr), int(s.batch_size),
                     float(s.momentum), _seed(seed, rnd, k))
            else:
                stats = dp_sgd(local, x, t, privacies[k], steps=int(s.local_steps),
                               sample_rate=rates[k], max_grad_norm=float(s.clip),
                               lr=float(s.lr), momentum=float(s.momentum),
                               seed=_seed(seed, rnd, k))
                signal.append(stats["signal_norm"])
                noise.append(stats["noise_norm"])
            results.append((_weights(local), len(idx)))
        _load(head, fedavg(results))
    info = {"epsilon": None, "sigma": None, "q": rates, "steps": steps}
    if privacies is not None:
        info.update(epsilon=max(p.epsilon(delta) for p in privacies),
                    sigma=[p.noise_multiplier for p in privacies],
                    signal_norm=float(np.mean(signal)), noise_norm=float(np.mean(noise)))
    return head, info


def train_central_dp(s: DictConfig, holders: list[tuple[str, np.ndarray]],
                     feats: torch.Tensor, y: torch.Tensor, num_classes: int,
                     epsilon: float | None, delta: float, seed: int) -> tuple[nn.Linear, dict]:
    """DP-FedAvg over the sites: each round every site takes ``local_steps`` full-batch SGD
    steps from the global head; the server clips each update to C, averages (unweighted) and
    adds N(0, (sigma C / K)^2) (:class:`CentralDP`, sigma calibrated for ``rounds`` steps at
    q = 1), then a server SGD step (``server_lr``, ``server_momentum``: post-processing).
    ``epsilon=None``: FedAvg of the unclipped updates, no noise, same server step."""
    head = nn.Linear(feats.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    rounds, k = int(s.rounds), len(holders)
    central = None
    if epsilon is not None:
        sigma = calibrate_noise(epsilon, delta, 1.0, rounds)
        central = CentralDP(CentralDPConfig(noise_multiplier=sigma, clip_norm=float(s.clip),
                                            delta=delta), num_clients=k, seed=seed)
    server = ServerSGD(lr=float(s.server_lr), momentum=float(s.server_momentum))
    x, t, mask = _padded(holders, feats, y, num_classes)
    signal, noise = [], []
    for _ in range(rounds):
        start = _weights(head)
        w, b = local_gd(head.weight.detach(), head.bias.detach(), x, t, mask,
                        int(s.local_steps), float(s.lr))
        results = [([w[j].numpy(), b[j].numpy()], len(idx))
                   for j, (_, idx) in enumerate(holders)]
        if central is None:
            aggregate = fedavg(results)
        else:
            clipped = [flatten(clip_update(w, start, central.cfg.clip_norm)[0])
                       for w, _ in results]
            mean = np.mean(clipped, axis=0)
            aggregate = central.add_noise(start, unflatten(mean, Layout.of(start)), k)
            signal.append(float(np.linalg.norm(mean - flatten(start))))
            noise.append(float(np.linalg.norm(flatten(aggregate) - mean)))
        _load(head, server.step(start, aggregate))
    info = {"epsilon": None, "sigma": None, "q": 1.0, "steps": rounds}
    if central is not None:
        info.update(epsilon=central.epsilon(delta), sigma=central.cfg.noise_multiplier,
                    signal_norm=float(np.mean(signal)), noise_norm=float(np.mean(noise)))
    return head, info


def uf1(head: nn.Linear, feats: torch.Tensor, y: np.ndarray, class_names: list[str]) -> float:
    with torch.no_grad():
        pred = head(feats).argmax(1).numpy()
    return recognition_metrics(y, pred, class_names)["uf1"]


# --------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------


def _holders(name: str, s: DictConfig, samples: FlowSamples, labs, seed: int):
    where = f"dp_curve.settings.{name}"
    if s.clients not in CLIENTS:
        raise DPCurveConfigError(f"{where}.clients={s.clients}: use one of {CLIENTS}")
    train = np.concatenate([c.train_idx for c in labs])
    if s.clients == "labs":
        return [(c.name, c.train_idx) for c in labs]
    if s.clients == "pooled":
        return [("pooled", train)]
    if s.get("num_sites") is None:
        raise DPCurveConfigError(f"{where}: clients=sites needs num_sites")
    sites = deal_sites(samples, train, int(s.num_sites), seed)
    return [(f"site{j}", idx) for j, idx in enumerate(sites)]


def run_setting(name: str, s: DictConfig, holders, feats: torch.Tensor, y: torch.Tensor,
                test_idx: np.ndarray, samples: FlowSamples, epsilons: list[float],
                delta: float, repeats: int, seed: int) -> dict:
    """The non-private figure and one point per epsilon (mean / std over ``repeats``)."""
    train = train_central_dp if MECHANISMS[s.clients] == "central_dp" else train_dp_sgd
    y_test = samples.labels[test_idx]

    def point(eps: float | None) -> dict:
        scores, infos = [], []
        for r in range(repeats):
            head, info = train(s, holders, feats, y, samples.num_classes, eps, delta,
                               _seed(seed, r, 0 if eps is None else int(eps * 1000)))
            scores.append(uf1(head, feats[test_idx], y_test, samples.class_names))
            infos.append(info)
        out = {"target_epsilon": eps, "uf1": float(np.mean(scores)),
               "uf1_std": float(np.std(scores)), "uf1_runs": scores,
               "sigma": infos[0]["sigma"], "q": infos[0]["q"], "steps": infos[0]["steps"]}
        if eps is not None:
            out["epsilon"] = float(max(i["epsilon"] for i in infos))
            out["signal_norm"] = float(np.mean([i["signal_norm"] for i in infos]))
            out["noise_norm"] = float(np.mean([i["noise_norm"] for i in infos]))
        return out

    t0 = time.perf_counter()
    nonprivate = point(None)
    points = [point(float(e)) for e in epsilons]
    for p in points:
        p["fraction_of_nonprivate"] = p["uf1"] / nonprivate["uf1"] if nonprivate["uf1"] else \
            math.nan
    return {"name": name, "clients": s.clients, "mechanism": MECHANISMS[s.clients],
            "holders": len(holders), "holder_sizes": [int(len(i)) for _, i in holders],
            "params": int(feats.shape[1] * samples.num_classes + samples.num_classes),
            "recipe": OmegaConf.to_container(s, resolve=True), "nonprivate": nonprivate,
            "points": points, "seconds": time.perf_counter() - t0}


def reference_end_to_end(samples: FlowSamples, train_idx: np.ndarray, test_idx: np.ndarray,
                         ecfg: DictConfig, seed: int, cache_dir: Path) -> float:
    """UF1 of the extractor's network trained end to end on the private training split,
    non-privately, with the extractor's own recipe (what freezing the extractor costs)."""
    record = extractor_for(samples.subset(train_idx), ecfg, seed, cache_dir)
    net = FrozenHead(samples.num_classes, samples.x.shape[1], extractor=record)
    with torch.no_grad():
        raw = net.extractor(torch.from_numpy(samples.x[test_idx]))
        logits = F.linear(raw, record["classifier"]["weight"], record["classifier"]["bias"])
    return recognition_metrics(samples.labels[test_idx], logits.argmax(1).numpy(),
                               samples.class_names)["uf1"]


def run_dp_curve(cfg: DictConfig, run_dir: Path) -> dict:
    """Every setting of ``cfg.dp_curve``: the curve, its table and its plot."""
    dc = cfg.dp_curve
    full = bool(dc.get("full", False))
    epsilons = [float(e) for e in (dc.full_epsilons if full else dc.epsilons)]
    repeats = int(dc.full_repeats if full else dc.repeats)
    if not epsilons or min(epsilons) <= 0 or repeats < 1:
        raise DPCurveConfigError(f"dp_curve: epsilons {epsilons} must be > 0 and repeats "
                                 f"{repeats} >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(dc.get("threads", 1)))  # tiny ops: more threads only contend
    try:
        return _run(cfg, run_dir, epsilons, repeats, full)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, run_dir: Path, epsilons: list[float], repeats: int,
         full: bool) -> dict:
    from mer.data.sources import load_samples

    dc = cfg.dp_curve
    delta, seed = float(dc.delta), int(cfg.seed)
    t0 = time.perf_counter()
    private = load_samples(cfg.data, cfg.paths.cache_dir)
    public = load_samples(public_data_config(cfg), cfg.paths.cache_dir)
    if public.class_names != private.class_names:
        raise DPCurveConfigError(f"public classes {public.class_names} differ from the private "
                                 f"{private.class_names}: use the same data.label_scheme")
    checked = check_disjoint(private, public)
    labs = natural_clients(private, float(dc.test_fraction), seed)
    check_partition(private, labs)  # no subject on both sides, none in two labs
    train_idx = np.concatenate([c.train_idx for c in labs])
    test_idx = np.concatenate([c.test_idx for c in labs])
    record = extractor_for(public, dc.extractor, seed, Path(cfg.paths.cache_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(record, run_dir / "extractor.pt")
    model = FrozenHead(private.num_classes, private.x.shape[1], extractor=record)
    feats = model.features(torch.from_numpy(private.x))
    y = torch.as_tensor(private.labels.copy())
    public_head = nn.Linear(model.feature_dim, private.num_classes)
    with torch.no_grad():  # W f + b with f = std * z + mean, z the standardised features
        public_head.weight.copy_(record["classifier"]["weight"] * model.feature_std)
        public_head.bias.copy_(record["classifier"]["bias"] + record["classifier"]["weight"]
                               @ model.feature_mean)
    references = {"public_only": uf1(public_head, feats[test_idx], private.labels[test_idx],
                                     private.class_names)}
    if dc.get("reference_end_to_end", True):
        references["end_to_end"] = reference_end_to_end(
            private, train_idx, test_idx, dc.extractor, seed, Path(cfg.paths.cache_dir))
    settings = []
    for name, s in dc.settings.items():
        holders = _holders(name, s, private, labs, seed)
        with warnings.catch_warnings():  # Opacus: "optimal order is the largest/smallest alpha"
            warnings.filterwarnings("ignore", message=r".*Optimal order is the.*alpha.*")
            settings.append(run_setting(name, s, holders, feats, y, test_idx, private,
                                        epsilons, delta, repeats, seed))
        log.info("dp_curve %s done in %.0f s", name, settings[-1]["seconds"])
    for st in settings:  # judged also against the strongest non-private figure
        st["best_nonprivate"] = max([st["nonprivate"]["uf1"], references.get("end_to_end", 0)])
        for p in st["points"]:
            p["fraction_of_best_nonprivate"] = p["uf1"] / st["best_nonprivate"] \
                if st["best_nonprivate"] else math.nan
    keys = private.meta["subject_key"].to_numpy()
    report = {
        "name": cfg.name, "synthetic": private.synthetic, "data": cfg.data.name,
        "data_seed": int(cfg.data.get("seed", 0)), "public_seed": int(dc.public.get("seed", -1)),
        "public_clips": checked, "public_clips_shared_with_private": 0,
        "classes": private.class_names, "delta": delta, "repeats": repeats, "full": full,
        "train_clips": int(len(train_idx)), "test_clips": int(len(test_idx)),
        "train_subjects": int(len(set(keys[train_idx]))),
        "test_subjects": sorted(set(keys[test_idx])),
        "extractor": {"sha256": model.extractor_sha256, "feature_dim": model.feature_dim,
                      **OmegaConf.to_container(dc.extractor, resolve=True)},
        "references": references, "settings": settings,
        "target": {"fraction": float(dc.target_fraction), "epsilon": float(dc.target_epsilon)},
        "seconds": time.perf_counter() - t0,
    }
    report["summary"] = summarise(report)
    _atomic_write(run_dir / "dp_curve.json", json.dumps(report, indent=2))
    _atomic_write(run_dir / "dp_curve.md", curve_markdown(report))
    plot_curve(report, run_dir / "dp_curve.png")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(curve_markdown(report)))
    return report


def summarise(report: dict) -> dict:
    """Per setting: its point at the largest epsilon <= target (no choosing among points by
    their test UF1), as a fraction of its own non-private UF1 and of the strongest
    non-private figure (its own or the end-to-end network's); the target is met where the
    stricter of the two reaches the fraction."""
    target = report["target"]
    rows = {}
    for s in report["settings"]:
        ok = [p for p in s["points"] if p["epsilon"] <= target["epsilon"] + 1e-9]
        best = max(ok, key=lambda p: p["epsilon"], default=None)
        rows[s["name"]] = None if best is None else {
            "epsilon": best["epsilon"], "uf1": best["uf1"],
            "fraction": best["fraction_of_nonprivate"],
            "fraction_of_best": best["fraction_of_best_nonprivate"]}
    met = [n for n, b in rows.items() if b and b["fraction_of_best"] >= target["fraction"]]
    best_uf1 = max((b["uf1"] for b in rows.values() if b), default=math.nan)
    return {"best_at_target": rows, "met_by": met, "best_dp_uf1": best_uf1}


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, list):
        return f"{min(x):.{digits}g}–{max(x):.{digits}g}" if len(set(x)) > 1 else \
            f"{x[0]:.{digits}g}"
    return f"{x:.{digits}f}"


def curve_markdown(report: dict) -> str:
    """The table of every setting's points, the references and the signal-to-noise note."""
    tag = " (SYNTHETIC data: SynME)" if report["synthetic"] else ""
    t = report["target"]
    refs = report["references"]
    lines = [
        f"# DP curve: UF1 against epsilon (delta {report['delta']:.0e}){tag}", "",
        f"Private data: {report['data']} seed {report['data_seed']}, "
        f"{report['train_clips']} training clips of {report['train_subjects']} subjects; "
        f"test: {report['test_clips']} clips of {len(report['test_subjects'])} other subjects "
        f"(the union of the labs' subject-disjoint test splits). Public data: a separate "
        f"SynME draw (seed {report['public_seed']}, {report['public_clips']} clips, no flow "
        f"image in common). Extractor: {report['extractor']['model']} with a "
        f"{report['extractor']['feature_dim']}-dim bottleneck, frozen "
        f"({report['extractor']['sha256'][:12]}). Mean ± std over {report['repeats']} "
        "noise seeds; final model after fixed rounds, nothing selected on the test set.", "",
        "References (non-private): public data only (extractor + its public classifier) "
        f"UF1 {_fmt(refs['public_only'])}"
        + (f"; the same network trained end to end on the private training clips UF1 "
           f"{_fmt(refs['end_to_end'])}" if "end_to_end" in refs else "") + ".", "",
        "| setting | holders | D | target ε | achieved ε | σ | q | steps | UF1 | of own "
        "non-private | of best non-private | signal / noise per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["settings"]:
        n = s["nonprivate"]
        lines.append(f"| {s['name']} | {s['holders']} | {s['params']} | non-private | ∞ | 0 | "
                     f"{_fmt(n['q'])} | {n['steps']} | {_fmt(n['uf1'])} ± {_fmt(n['uf1_std'])}"
                     f" | 100% | {100 * n['uf1'] / s['best_nonprivate']:.0f}% | – |")
        for p in s["points"]:
            snr = p["signal_norm"] / p["noise_norm"] if p["noise_norm"] else math.inf
            lines.append(
                f"| {s['name']} | {s['holders']} | {s['params']} | {p['target_epsilon']:g} | "
                f"{p['epsilon']:.2f} | {_fmt(p['sigma'])} | {_fmt(p['q'])} | {p['steps']} | "
                f"{_fmt(p['uf1'])} ± {_fmt(p['uf1_std'])} | "
                f"{100 * p['fraction_of_nonprivate']:.0f}% | "
                f"{100 * p['fraction_of_best_nonprivate']:.0f}% | {p['signal_norm']:.2f} / "
                f"{p['noise_norm']:.2f} = {snr:.2f} |")
    summary = report["summary"]
    lines += ["", f"Target: {100 * t['fraction']:.0f}% of the non-private UF1 at epsilon <= "
              f"{t['epsilon']:g}, judged against the best non-private figure (the setting's "
              "own recipe without clipping and noise, or the network trained end to end on "
              "the private clips, whichever is higher)."]
    for name, b in summary["best_at_target"].items():
        if b:
            lines.append(f"- {name}: UF1 {b['uf1']:.3f} at epsilon {b['epsilon']:.2f}: "
                         f"{100 * b['fraction_of_best']:.0f}% of the best non-private figure "
                         f"({100 * b['fraction']:.0f}% of its own recipe's).")
    lines.append(f"- Met by: {', '.join(summary['met_by'])}." if summary["met_by"] else
                 "- Met by no setting.")
    best = summary["best_dp_uf1"]
    if refs["public_only"] >= best - 0.02:
        lines += ["", f"Caveat: the public data alone scores {refs['public_only']:.3f}, about "
                  f"as much as the best DP head ({best:.3f}). On SynME the public draw comes "
                  "from the same generator as the private data, so the private clips add "
                  "little beyond it; a real public database (other people, another lab) "
                  "would be further from the private data."]
    lines += [
        "", "Signal and noise: the norm of the summed clipped per-sample gradients (DP-SGD: "
        "at most the batch size times C) or of the mean clipped site update (central DP: at "
        "most C), against the norm of the Gaussian noise added to it (sigma C sqrt(D), and "
        "sigma C sqrt(D) / K for K sites), per step, averaged. Noise grows with sqrt(D): "
        "the same budget on the full STSTNet (D ~ 1.7k) has about 6x the noise norm of a "
        f"{report['settings'][0]['params'] if report['settings'] else 51}-parameter head, "
        "and full-batch steps (q = 1) get no amplification by subsampling."]
    return "\n".join(lines) + "\n"


def plot_curve(report: dict, path: Path) -> None:
    """UF1 against epsilon (log scale), one line per setting, its non-private UF1 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(report["settings"]):
        c = colours[i % len(colours)]
        eps = [p["epsilon"] for p in s["points"]]
        ax.errorbar(eps, [p["uf1"] for p in s["points"]],
                    yerr=[p["uf1_std"] for p in s["points"]], marker="o", color=c, capsize=3,
                    label=f"{s['name']} (DP)")
        ax.axhline(s["nonprivate"]["uf1"], color=c, ls="--", lw=1,
                   label=f"{s['name']} non-private")
    refs = report["references"]
    ax.axhline(refs["public_only"], color="grey", ls=":", lw=1, label="public data only")
    if "end_to_end" in refs:
        ax.axhline(refs["end_to_end"], color="black", ls=":", lw=1,
                   label="end to end, non-private")
    ax.axvline(report["target"]["epsilon"], color="grey", lw=0.5)
    ax.set(xscale="log", xlabel=f"epsilon (delta {report['delta']:.0e})", ylabel="UF1",
           title="DP curve" + (" (synthetic data: SynME)" if report["synthetic"] else ""))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
