"""The federated loop: rounds of local Lightning training at each client, then aggregation.

Each round every selected client builds a fresh Lightning ``Trainer``, loads the global model
(or, under P-FedProx personalisation, its own personalised model), trains ``local_epochs`` on
its own training split (with the FedProx term when ``mu > 0``) and returns its weights and
example count. The server checks the updates (non-finite ones are excluded and counted),
aggregates them with the configured rule and applies its optimiser. Every ``eval_every``
rounds each client's test split is scored with the global and with its personalised model,
and the figures pooled over clients. Samples never leave their client: the server only sees
weights (and, for DPK-GAT's data prior, AU co-occurrence counts).
"""

from __future__ import annotations

import logging
import time
import warnings

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mer.data.datamodule import SplitDataModule
from mer.data.samples import FlowSamples
from mer.engine.build import build_module, uses_aus
from mer.engine.metrics import recognition_metrics
from mer.engine.module import MERModule
from mer.federated import aggregators
from mer.federated.partition import (
    ClientData,
    check_partition,
    natural_clients,
    subject_clients,
)
from mer.federated.server_opt import FedAdagrad, FedAdam, FedYogi, ServerOptimizer, ServerSGD

log = logging.getLogger(__name__)
Weights = list[np.ndarray]


def get_weights(module: MERModule) -> Weights:
    """The network's state (parameters and buffers) as numpy arrays, state-dict order."""
    return [v.detach().cpu().numpy().copy() for v in module.net.state_dict().values()]


def set_weights(module: MERModule, weights: Weights) -> None:
    state = module.net.state_dict()
    if len(state) != len(weights):
        raise ValueError(f"incompatible state: {len(weights)} arrays for {len(state)} entries")
    module.net.load_state_dict({k: torch.as_tensor(w).to(v.dtype).reshape(v.shape)
                                for (k, v), w in zip(state.items(), weights)})


def make_server_optimizer(cfg: DictConfig) -> ServerOptimizer:
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    return {"sgd": ServerSGD, "fedadam": FedAdam, "fedyogi": FedYogi,
            "fedadagrad": FedAdagrad}[cfg.name](**kwargs)


def aggregate(rule: DictConfig, results: list[tuple[Weights, int]]) -> Weights:
    """Apply the configured aggregation rule to the kept client results."""
    name = rule.name
    if name in ("fedavg", "fedprox"):
        return aggregators.fedavg(results)
    if name == "median":
        return aggregators.median(results)
    if name == "trimmed_mean":
        return aggregators.trimmed_mean(results, rule.beta)
    if name == "krum":
        return aggregators.krum(results, rule.num_malicious, rule.get("num_to_keep", 1))
    raise ValueError(f"unknown aggregation rule '{name}'")


class FederatedRun:
    """State and steps of one federated experiment over in-process clients."""

    def __init__(self, cfg: DictConfig, samples: FlowSamples, clients: list[ClientData]) -> None:
        check_partition(samples, clients)
        self.cfg, self.fed, self.samples, self.clients = cfg, cfg.federated, samples, clients
        self.model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        self.seed = int(cfg.seed)
        # The server sums the clients' AU co-occurrence counts: the prior of all training splits.
        train_all = np.concatenate([c.train_idx for c in clients])
        L.seed_everything(self.seed, verbose=False)
        self.global_weights = get_weights(build_module(self.model_cfg, samples, train_all))
        self.initial_weights = [w.copy() for w in self.global_weights]
        self.personal: dict[str, Weights] = {}
        self.server_opt = make_server_optimizer(self.fed.server_opt)
        self.excluded: list[dict] = []
        self.failures: list[dict] = []
        self.curves: list[dict] = []

    # -- client side ---------------------------------------------------------------------------

    def _module(self, weights: Weights) -> MERModule:
        module = build_module(self.model_cfg, self.samples, np.array([], dtype=np.int64))
        set_weights(module, weights)
        return module

    def _datamodule(self, client: ClientData, eval_idx: np.ndarray, seed: int,
                    module: MERModule) -> SplitDataModule:
        return SplitDataModule(self.samples, client.train_idx, eval_idx,
                               batch_size=int(self.cfg.data.batch_size),
                               shuffle=bool(self.cfg.data.shuffle), seed=seed,
                               with_aus=uses_aus(module))

    def fit(self, start: Weights, train: ClientData, epochs: int, seed: int,
            anchor: list[torch.Tensor] | None = None) -> Weights:
        """Train from ``start`` on ``train.train_idx`` for ``epochs`` with a fresh Trainer
        (FedProx term towards the ``anchor`` parameters when ``federated.mu`` > 0)."""
        L.seed_everything(seed, verbose=False)
        module = self._module(start)
        if anchor is not None and self.fed.mu:
            module.set_proximal(float(self.fed.mu), anchor)
        trainer_kwargs = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        trainer_kwargs["max_epochs"] = int(epochs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer = L.Trainer(logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False,
                                limit_val_batches=0, **trainer_kwargs)
            trainer.fit(module, datamodule=self._datamodule(train, train.test_idx, seed,
                                                            module))
        return get_weights(module)

    def train_client(self, client: ClientData, rnd: int, k: int,
                     anchor: list[torch.Tensor] | None = None) -> tuple[Weights, int]:
        """Local training of one client from its starting model; returns (weights, n)."""
        start = self.personal.get(client.name, self.global_weights)
        seed = self.seed * 100_003 + rnd * 101 + k
        weights = self.fit(start, client, int(self.fed.local_epochs), seed, anchor=anchor)
        return weights, len(client.train_idx)

    def baselines(self, epochs: int) -> dict:
        """Pooled (centralised on all clients' training splits) and local-only training, from
        the same initial model, each scored on every client's own test split."""
        pooled_train = ClientData("pooled", np.concatenate([c.train_idx for c in self.clients]),
                                  np.array([], dtype=np.int64))
        pooled = self.fit(self.initial_weights, pooled_train, epochs, self.seed + 1)
        local = {c.name: self.fit(self.initial_weights, c, epochs, self.seed + 2 + k)
                 for k, c in enumerate(self.clients)}
        return {"epochs": epochs,
                **self.evaluate({"pooled": lambda c: pooled, "local": lambda c: local[c.name]})}

    def predict(self, weights: Weights, client: ClientData) -> np.ndarray:
        """(n_test, K) class probabilities of ``weights`` on a client's test split."""
        module = self._module(weights).eval()
        loader = self._datamodule(client, client.test_idx, 0, module).predict_dataloader()
        with torch.no_grad():
            return torch.cat([module.predict_step(b, i) for i, b in enumerate(loader)]).numpy()

    # -- server side ---------------------------------------------------------------------------

    def select_clients(self, rnd: int) -> list[int]:
        n = len(self.clients)
        m = max(int(self.fed.min_clients), int(np.ceil(float(self.fed.fraction) * n)))
        m = min(n, m)
        rng = np.random.default_rng([self.seed, rnd])
        return sorted(rng.choice(n, m, replace=False).tolist())

    def _local_results(self, rnd: int, chosen: list[int]) -> tuple[list, list[str], list, list]:
        """Train the chosen clients, minus dropouts and failures (both logged and counted)."""
        faults = self.fed.get("faults") or {}
        rng = np.random.default_rng([self.seed, rnd, 1])
        results, names, dropped, failed = [], [], [], []
        # the round's global parameters, the FedProx anchor of every client (built once)
        anchor = list(self._module(self.global_weights).net.parameters()) if self.fed.mu \
            else None
        for k in chosen:
            name = self.clients[k].name
            if rng.random() < float(faults.get("dropout", 0.0)):
                dropped.append(name)
                continue
            try:
                if {"client": name, "round": rnd} in (faults.get("crash") or []):
                    raise RuntimeError("injected fault (federated.faults.crash)")
                results.append(self.train_client(self.clients[k], rnd, k, anchor))
                names.append(name)
            except Exception as e:  # a lab's failure must not stop the federation
                log.warning("round %d: client %s failed: %s", rnd, name, e)
                failed.append({"round": rnd, "client": name, "error": repr(e)})
        return results, names, dropped, failed

    def round(self, rnd: int) -> dict:
        """One round: local training at the selected clients, checks, aggregation, server step.

        Dropped-out and failing clients are left out of the round (logged and counted); with
        no update left the global model stays as it was.
        """
        t0 = time.perf_counter()
        chosen = self.select_clients(rnd)
        results, names, dropped, failed = self._local_results(rnd, chosen)
        self.failures += failed
        t_clients = time.perf_counter() - t0
        kept, excluded = aggregators.check_updates(results, names, self.global_weights)
        for name, reason in excluded.items():
            log.warning("round %d: client %s excluded: %s", rnd, name, reason)
            self.excluded.append({"round": rnd, "client": name, "reason": reason})
        if kept:
            agg = aggregate(self.fed.rule, kept)
            self.global_weights = self.server_opt.step(self.global_weights, agg)
        else:
            log.warning("round %d: no client update to aggregate; global model unchanged", rnd)
        personalise = self.fed.get("personalise")
        if personalise and kept:
            kept_names = [n for n in names if n not in excluded]
            mixed = aggregators.pfedprox_personalise(
                [w for w, _ in kept], [n for _, n in kept], own=float(personalise.own))
            self.personal.update(dict(zip(kept_names, mixed)))
        return {"round": rnd, "clients": names, "excluded": sorted(excluded),
                "dropped": dropped, "failed": [f["client"] for f in failed],
                "client_s": t_clients, "server_s": time.perf_counter() - t0 - t_clients,
                "bytes_per_client": int(sum(a.nbytes for a in self.global_weights))}

    def evaluate(self, models: dict | None = None) -> dict:
        """Per-client and pooled test metrics of each model kind.

        ``models`` maps a kind to ``client -> weights``; by default the global model and each
        client's personalised model.
        """
        models = models or {
            "global": lambda c: self.global_weights,
            "personalised": lambda c: self.personal.get(c.name, self.global_weights),
        }
        names = self.samples.class_names
        out: dict = {"per_client": {}}
        preds: dict[str, list] = {kind: [] for kind in models}
        labels = []
        for c in self.clients:
            y = self.samples.labels[c.test_idx]
            labels.append(y)
            row = {}
            for kind, weights_of in models.items():
                pred = self.predict(weights_of(c), c).argmax(1)
                preds[kind].append(pred)
                m = recognition_metrics(y, pred, names)
                row[kind] = {k: m[k] for k in ("n", "uf1", "uar", "accuracy")}
            out["per_client"][c.name] = row
        y = np.concatenate(labels)
        for kind in models:
            m = recognition_metrics(y, np.concatenate(preds[kind]), names)
            out[f"pooled_{kind}"] = {k: m[k] for k in ("n", "uf1", "uar", "accuracy")}
        return out


def make_clients(cfg: DictConfig, samples: FlowSamples) -> list[ClientData]:
    part = cfg.federated.partition
    if part.kind == "natural":
        return natural_clients(samples, float(part.test_fraction), int(cfg.seed))
    return subject_clients(samples, int(part.num_clients), part.kind, float(part.get("alpha", 0.5)),
                           float(part.test_fraction), int(cfg.seed))


def run_federated(cfg: DictConfig, samples: FlowSamples, show_progress: bool = True) -> dict:
    """All rounds; returns curves, final per-client/pooled metrics and round statistics."""
    from rich.progress import Progress

    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients)
    rounds, every = int(cfg.federated.rounds), int(cfg.federated.eval_every)
    stats = []
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("federated rounds", total=rounds)
        for rnd in range(1, rounds + 1):
            stats.append(run.round(rnd))
            if rnd % every == 0 or rnd == rounds:
                run.curves.append({"round": rnd, **run.evaluate()})
            progress.advance(task)
    final = run.curves[-1]
    baselines = None
    if cfg.federated.get("baselines", False):
        epochs = cfg.federated.get("baseline_epochs") or rounds * int(cfg.federated.local_epochs)
        baselines = run.baselines(int(epochs))
    return {
        "baselines": baselines,
        "clients": {c.name: {"train": len(c.train_idx), "test": len(c.test_idx),
                             "subjects": int(samples.meta["subject_key"].iloc[
                                 np.concatenate([c.train_idx, c.test_idx])].nunique())}
                    for c in clients},
        "final": final, "curves": run.curves, "rounds": stats, "excluded_updates": run.excluded,
        "client_failures": run.failures,
        "dropouts": sum(len(r["dropped"]) for r in stats),
    }
