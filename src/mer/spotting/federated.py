"""Federated spotting: a learned spotter as a task of mer's federated loop, one lab per
long-video database (:class:`SpotTask`, used by ``python -m mer.run +experiment=fed_spot``).

The loop (:class:`mer.federated.loop.FederatedRun`) runs rounds, rules (FedAvg, FedProx,
FedBN, SCAFFOLD, FedNova, robust), secure aggregation, faults and checkpoints as for
recognition; this task says what a lab's data, module, training and figures are:

- **Labs**: each lab's training subjects are split into fit and validation subjects
  (``spotter.val_subjects``, :func:`mer.spotting.base.split_subjects`); its test subjects
  come from the experiment (``fed_spot.test_fraction``). A client's ``train_idx`` /
  ``test_idx`` index :attr:`SpotTask.videos`.
- **Set-up** (the template, hook b): every lab builds the network from the same seed on its
  fit videos; the parameters are identical, the buffers (per-channel feature scale,
  MESFusion's flow scale) differ. The server starts from their size-weighted mean (weights:
  positions) and the expected interval lengths from the size-weighted mean of the labs'
  medians: each lab sends ``[n w, n]`` and ``[n, n before, n after]`` per type, summed.
- **Local training** (hook a): the lab's windows (:meth:`LearnedSpotter.training_set`, with
  the inputs scaled by the model's own buffers), ``local_epochs`` with a fresh CPU Trainer
  seeded as :func:`mer.spotting.module.fit_module`; the update weighs its window count.
- **Figures** (hooks c, d): for each model kind, each lab counts ``(TP, predictions, ground
  truths)`` per candidate threshold and type on its validation videos; the server sums them
  and picks the best pooled F1 (:func:`mer.spotting.base.best_thresholds`). Then each lab
  spots its test videos with those thresholds and sends its MEGC counts per type; the pooled
  table is their sum (MEGC F1 is a ratio of summed counts, never a mean of F1s).

Every per-lab vector goes through :func:`mer.federated.task.lab_sum`: under
``privacy=secagg | ckks`` only the sum of the labs' protected vectors is opened, so the
server never holds a video, score, interval or any one lab's counts (per-lab tables only with
``privacy.disclose_per_lab``). The annotated intervals stay at the labs
(:attr:`SpotTask.lab_intervals`; the in-process experiment writes them as each lab would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mer.config_rules import ConfigError
from mer.federated.client import get_weights, set_weights
from mer.federated.partition import ClientData
from mer.federated.task import Task, lab_sum
from mer.privacy.base import Layout, TooFewContributors, flatten, unflatten
from mer.spotting.base import TYPES, best_thresholds, split_subjects, threshold_counts
from mer.spotting.matching import counts, evaluate
from mer.spotting.module import TRAINER, SpotModule, WindowSet, seeded_loader
from mer.spotting.registry import create_spotter
from mer.spotting.runner import gt_table
from mer.spotting.videos import SpotVideo, expected_lengths


@dataclass
class Lab:
    """One lab: its own spotter object, videos (prepared fit / validation videos, raw test
    videos) and its training window count (its update's weight)."""

    name: str
    spotter: Any
    fit: list[SpotVideo]
    val: list[SpotVideo]
    test: list[SpotVideo]
    windows: int


class LabWindows(L.LightningDataModule):
    """A lab's training windows as a datamodule; the loader is made, and every generator
    seeded, when the Trainer asks for it (as :func:`mer.spotting.module.fit_module`)."""

    def __init__(self, data: WindowSet, batch_size: int, seed: int) -> None:
        super().__init__()
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return seeded_loader(self.data, self.batch_size, self.seed)


class SpotTask(Task):
    """A learned spotter (apex_score, mesfusion, me_tst) trained by the federated loop, one
    client per lab (module docstring).

    Args:
        spotter_cfg: the spotter's config (``name`` plus settings; ``epochs`` unused here:
            the loop's ``federated.local_epochs`` per round).
        splits: ``{lab: (training videos, test videos)}`` (``fed_spot.lab_splits``).
        seed: the run's seed (network initialisation, validation subjects, windows).
    """

    name = "spotting"

    def __init__(self, spotter_cfg: dict, splits: dict[str, tuple[list, list]],
                 seed: int) -> None:
        super().__init__(None)
        self.spotter_cfg, self.seed = dict(spotter_cfg), int(seed)
        self.labs: dict[str, Lab] = {}
        for db, (train, test) in splits.items():
            sp = create_spotter(self.spotter_cfg, seed=self.seed)
            if not getattr(sp, "learned", False):
                raise ConfigError([f"fed_spot.spotter.name={sp.name}: federated spotting "
                                   "trains a network; use a learned spotter (apex_score, "
                                   "mesfusion, me_tst)"])
            prepared = [sp.prepare(v) for v in train]
            fit, val = split_subjects(prepared, sp.val_subjects, self.seed)
            windows = len(sp.training_windows(fit)[1])
            self.labs[db] = Lab(db, sp, fit, val or fit, list(test), windows)
        self.videos: list[SpotVideo] = []
        self.clients: list[ClientData] = []
        for lab in self.labs.values():
            start = len(self.videos)
            self.videos += lab.fit + lab.test
            self.clients.append(ClientData(
                lab.name, np.arange(start, start + len(lab.fit)),
                np.arange(start + len(lab.fit), len(self.videos))))
        self.candidates = next(iter(self.labs.values())).spotter.candidates
        self.lengths: dict | None = None
        self.lab_intervals: dict[str, dict[str, pd.DataFrame]] = {}
        self._last: dict | None = None  # the latest evaluation's thresholds (statistics)

    # -- what the loop may run ------------------------------------------------------------

    def check(self, run: Any) -> None:
        problems = self.problems(run.cfg)
        if problems:
            raise ConfigError(problems)
        if [c.name for c in run.clients] != [c.name for c in self.clients]:
            raise ValueError(f"the run's clients {[c.name for c in run.clients]} are not "
                             f"this task's labs {[c.name for c in self.clients]}: pass "
                             "SpotTask.clients")

    def problems(self, cfg: DictConfig) -> list[str]:
        """What of ``cfg`` federated spotting cannot run, each naming the key and the fix."""
        problems = []
        privacy = str((cfg.get("privacy") or {}).get("name", "none"))
        least = (cfg.get("privacy") or {}).get("min_clients")
        if privacy in ("secagg", "ckks") and least is not None and int(least) > len(self.labs):
            problems.append(
                f"privacy.min_clients={least} but federated spotting has {len(self.labs)} labs "
                f"(one per long-video database: {sorted(self.labs)}): no protected sum would "
                f"ever be opened; set privacy.min_clients={len(self.labs)} (with two labs each "
                "can subtract its own part from a sum and learn the other's: secure "
                "aggregation hides a lab from the server, not from the other lab)")
        if privacy == "dp":
            problems.append(
                "privacy=dp cannot run for federated spotting: DP-SGD's guarantee is per "
                "training example, and a spotter's examples are overlapping windows of long "
                "videos (each subject gives many, each expression falls in two), so its "
                "epsilon would not bound what is learnt about a person or an expression; use "
                "privacy=secagg or privacy=ckks (updates protected in aggregation)")
        if privacy == "central_dp":
            problems.append(
                "privacy=central_dp is not wired for federated spotting (its noise calibration "
                "and the spotters' batch norm, which needs mer.privacy.dp.fix_module, are "
                "recognition's); use privacy=secagg or privacy=ckks, or privacy=none")
        fed = cfg.federated
        attack = ((fed.get("faults") or {}).get("byzantine") or {}).get("attack")
        if attack == "label_flip" and ((fed.get("faults") or {}).get("byzantine") or
                                       {}).get("clients"):
            problems.append("federated.faults.byzantine.attack=label_flip: a spotter has no "
                            "class labels to flip; use sign_flip, scaling or gaussian")
        if fed.get("baselines"):
            problems.append("federated.baselines=true: federated spotting runs its own "
                            "pooled and local-only baselines (fed_spot.baselines); set "
                            "federated.baselines=false")
        n = fed.get("num_clients")
        if (fed.get("partition") or {}).get("kind", "natural") != "natural" or \
                (n is not None and int(n) != len(self.labs)):
            problems.append(f"federated.partition / num_clients: federated spotting has one "
                            f"client per long-video database ({sorted(self.labs)}); leave "
                            "federated.partition.kind=natural and federated.num_clients=null")
        return problems

    def model_config(self, cfg: DictConfig, fidelity) -> dict:
        """The spotter's config, with the learning rate it trains with (a client optimiser
        such as SCAFFOLD's plain SGD takes it)."""
        return {**self.spotter_cfg, "lr": next(iter(self.labs.values())).spotter.lr}

    # -- modules --------------------------------------------------------------------------

    def _build(self, lab: Lab) -> SpotModule:
        lab.spotter.setup(lab.fit)
        return lab.spotter.module

    def build_module(self, run: Any, client: str | None = None) -> SpotModule:
        """``"template"``: the set-up round (module docstring); a lab's name: its module
        (its own data-derived state, e.g. ME-TST's class weights); None: a module to load
        weights into (scoring, the proximal anchor)."""
        if client == "template":
            return self._template(run)
        return self._build(self.labs.get(client) or next(iter(self.labs.values())))

    def _template(self, run: Any) -> SpotModule:
        states, lengths = {}, {}
        for lab in self.labs.values():  # each lab's side
            torch.manual_seed(self.seed)  # identical initial parameters at every lab
            module = self._build(lab)
            n = sum(v.length for v in lab.fit) / 1000.0  # kilo-positions: CKKS-sized sums
            states[lab.name] = np.append(flatten(get_weights(module)) * n, n)
            mine = expected_lengths(lab.fit)
            lengths[lab.name] = np.array([x for kind in TYPES for x in (
                mine[kind]["n"], mine[kind]["n"] * mine[kind]["before_s"],
                mine[kind]["n"] * mine[kind]["after_s"])], np.float64)
        total, _ = lab_sum(run, 0, states)  # the server's side: sums only
        layout = Layout.of(get_weights(module))
        set_weights(module, unflatten(total[:-1] / total[-1], layout))
        self.lengths = pooled_lengths(lab_sum(run, 0, lengths)[0])
        return module

    # -- local training -------------------------------------------------------------------

    def make_datamodule(self, run: Any, client: ClientData, module: SpotModule, seed: int,
                        flip: bool = False):
        lab = self.labs[client.name]
        lab.spotter.module = module  # inputs are scaled by the model's own buffers
        data = lab.spotter.training_set(lab.fit)
        return LabWindows(data, lab.spotter.batch_size, seed)

    def trainer_kwargs(self, run: Any, client: ClientData, epochs: int,
                       work: float = 1.0) -> dict:
        kwargs = {**TRAINER, "max_epochs": int(epochs)}
        if work < 1.0:
            lab = self.labs[client.name]
            batches = math.ceil(lab.windows / lab.spotter.batch_size)
            kwargs["max_steps"] = max(1, int(work * epochs * batches))
        return kwargs

    def num_examples(self, client: ClientData) -> int:
        return self.labs[client.name].windows

    def databases(self, client: ClientData) -> set[str]:
        return {v.database for v in self.labs[client.name].fit}

    def summary(self, clients: list[ClientData]) -> dict:
        return {lab.name: {"fit_videos": len(lab.fit), "val_videos": len(lab.val),
                           "test_videos": len(lab.test),
                           "subjects": len({v.subject_key for v in lab.fit + lab.val +
                                            lab.test})}
                for lab in self.labs.values()}

    # -- figures --------------------------------------------------------------------------

    def _spotter(self, run: Any, lab: Lab, weights) -> Any:
        """The lab's spotter holding ``weights`` (a scoring module kept by the run)."""
        sp = lab.spotter
        sp.module = run._scratch_module("predict", weights)
        sp.lengths, sp.fitted = self.lengths, True
        return sp

    def lab_threshold_counts(self, run: Any, lab: Lab, weights) -> np.ndarray:
        """A lab's side of the threshold round: (2 * candidates * 3,) counts ``(TP,
        predictions, ground truths)`` per type and candidate on its validation videos."""
        c = threshold_counts(self._spotter(run, lab, weights), lab.val)
        return np.concatenate([c[kind].ravel() for kind in TYPES]).astype(np.float64)

    def lab_test_counts(self, run: Any, lab: Lab, weights, thresholds: dict
                        ) -> tuple[np.ndarray, dict, pd.DataFrame]:
        """A lab's side of the scoring: its (6,) MEGC counts ``(TP, predictions, ground
        truths)`` of micro and macro on its test videos, its own table and intervals."""
        if not lab.test:  # a lab without test subjects adds nothing to the sum
            return np.zeros(3 * len(TYPES)), megc_from_counts(np.zeros(6)), pd.DataFrame()
        sp = self._spotter(run, lab, weights)
        sp.thresholds = thresholds
        preds = pd.concat([sp.spot(v) for v in lab.test], ignore_index=True)
        rows = pd.DataFrame({"video": [v.video for v in lab.test],
                             "database": [v.database for v in lab.test]})
        annotated, table = evaluate(preds, gt_table(lab.test), rows)
        vec = np.array([table["overall"][k][f] for k in TYPES for f in ("tp", "n_pred",
                                                                         "n_gt")], np.float64)
        return vec, table["overall"], annotated

    def evaluate(self, run: Any, models: dict, with_predictions: bool = False) -> dict:
        """Per kind: thresholds from the labs' summed validation counts, then the pooled MEGC
        table from their summed test counts (per-lab tables only in the clear or with
        ``privacy.disclose_per_lab``)."""
        rnd = run.round_done + 1
        disclose = run.secure is None or run.secure.disclose_per_lab
        out: dict = {"per_client": {}, "thresholds": {}, "selection": {}}
        done: dict[tuple, str] = {}
        for kind, weights_of in models.items():
            weights = {c.name: weights_of(c) for c in self.clients}
            same = tuple(id(w) for w in weights.values())
            if same in done:  # the same models as another kind (no personalisation)
                ref = done[same]
                for key in ("thresholds", "selection"):
                    out[key][kind] = out[key][ref]
                out[f"pooled_{kind}"] = out[f"pooled_{ref}"]
                for row in out["per_client"].values():
                    row[kind] = row[ref]
                if ref in self.lab_intervals:
                    self.lab_intervals[kind] = self.lab_intervals[ref]
                continue
            done[same] = kind
            try:
                total, _ = lab_sum(run, rnd, {lab.name: self.lab_threshold_counts(
                    run, lab, weights[lab.name]) for lab in self.labs.values()})
                per_type = np.rint(total).astype(np.int64).reshape(len(TYPES), -1, 3)
                thresholds, selection = best_thresholds(self.candidates, dict(zip(TYPES,
                                                                                  per_type)))
                sides = {lab.name: self.lab_test_counts(run, lab, weights[lab.name],
                                                        thresholds)
                         for lab in self.labs.values()}
                total, labs = lab_sum(run, rnd, {n: s[0] for n, s in sides.items()})
            except TooFewContributors as e:
                out["thresholds"][kind] = out["selection"][kind] = None
                out[f"pooled_{kind}"] = {"withheld": str(e)}
                continue
            out["thresholds"][kind], out["selection"][kind] = thresholds, selection
            out[f"pooled_{kind}"] = megc_from_counts(total)
            if disclose:
                for name, side in sides.items():
                    out["per_client"].setdefault(name, {})[kind] = side[1]
            if with_predictions:  # lab-side outputs, never part of what the server gets
                self.lab_intervals[kind] = {n: s[2] for n, s in sides.items()}
        if run.secure is not None:
            out["secure_evaluation"] = {"labs": len(self.labs), "per_lab_disclosed": disclose}
        self._last = {"round": run.round_done + 1, "thresholds": out["thresholds"].get(
            "global"), "selection": out["selection"].get("global")}
        return out

    def statistics(self, run: Any) -> dict:
        """The final global spotter's parameters: pooled lengths, thresholds (and the F1
        of every candidate) from the labs' summed validation counts."""
        if self._last is None or self._last["round"] < run.round_done:
            # resumed after the last round: no evaluation ran in this process, so the labs'
            # intervals of the final spotter are rebuilt too (intervals.csv)
            self.evaluate(run, {"global": run.default_models()["global"]},
                          with_predictions=True)
            self._last["round"] = run.round_done
        return {"lengths": self.lengths, "thresholds": self._last["thresholds"],
                "selection": self._last["selection"]}


def pooled_lengths(total: np.ndarray) -> dict:
    """Expected interval lengths from the labs' summed ``[n, n before, n after]`` per type
    (size-weighted mean of their medians; a type none has falls back to the defaults)."""
    default = expected_lengths([])
    out = {}
    for i, kind in enumerate(TYPES):
        n, before, after = total[3 * i: 3 * i + 3]
        out[kind] = ({"before_s": float(before / n), "after_s": float(after / n),
                      "n": int(round(n))} if n > 0.5 else default[kind])
    return out


def megc_from_counts(total: np.ndarray) -> dict:
    """The MEGC scopes (micro, macro, all: :func:`mer.spotting.matching.counts`) of summed
    ``(TP, predictions, ground truths)`` per type, shape (6,)."""
    c = np.rint(np.asarray(total)).astype(np.int64).reshape(len(TYPES), 3)
    out = {kind: counts(int(n_pred), int(n_gt), int(tp)) for kind, (tp, n_pred, n_gt)
           in zip(TYPES, c)}
    tp, n_pred, n_gt = c.sum(0)
    out["all"] = counts(int(n_pred), int(n_gt), int(tp))
    return out
