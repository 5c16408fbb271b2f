"""Faults and attacks a federation must survive, injected by configuration.

``federated.faults`` holds:

- ``dropout``: probability that a selected client drops out of a round (it sends nothing);
- ``stragglers: {probability, work}``: a straggling client does only ``work`` (0-1) of its
  local optimiser steps and sends what it has;
- ``deadline_s``: updates that take longer than this (wall time of the client's local
  training) are discarded by the server, and the client counted as late;
- ``crash: [{client, round}]``: the client raises mid-round (the round goes on without it);
- ``byzantine: {clients, attack, scale, sigma}``: the listed clients are malicious and
  send a manipulated update (:data:`ATTACKS`), or train on flipped labels (``label_flip``).

Draws are seeded by (seed, round, client), so a run and its resumed twin see the same faults.
The attacks are pure functions of the honest update ``y``, the round's global model ``x`` and
a generator; they act on floating arrays only (integer buffers are sent as they are).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig

Weights = list[np.ndarray]


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def sign_flip(y: Weights, x: Weights, scale: float, rng: np.random.Generator) -> Weights:
    """Send the reversed, amplified update: ``x - scale * (y - x)``."""
    return [(xi - scale * (yi - xi)).astype(yi.dtype) if _floating(yi) else yi.copy()
            for yi, xi in zip(y, x)]


def scaling(y: Weights, x: Weights, scale: float, rng: np.random.Generator) -> Weights:
    """Send the amplified update (model replacement): ``x + scale * (y - x)``."""
    return [(xi + scale * (yi - xi)).astype(yi.dtype) if _floating(yi) else yi.copy()
            for yi, xi in zip(y, x)]


def gaussian(y: Weights, x: Weights, sigma: float, rng: np.random.Generator) -> Weights:
    """Send noise instead of training: ``x + N(0, sigma^2)`` per coordinate."""
    return [(xi + rng.normal(0.0, sigma, xi.shape)).astype(yi.dtype) if _floating(yi)
            else yi.copy() for yi, xi in zip(y, x)]


ATTACKS: dict[str, Callable[[Weights, Weights, float, np.random.Generator], Weights]] = {
    "sign_flip": sign_flip, "scaling": scaling, "gaussian": gaussian,
}
DATA_ATTACKS = ("label_flip",)


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label-flip poisoning: class ``k`` becomes ``K - 1 - k``."""
    return (num_classes - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


class FaultPlan:
    """The faults of one federated run (``federated.faults``), drawn reproducibly."""

    def __init__(self, faults: DictConfig | dict | None, seed: int,
                 client_names: list[str]) -> None:
        faults = dict(faults or {})
        self.seed = seed
        self.dropout = float(faults.get("dropout") or 0.0)
        stragglers = dict(faults.get("stragglers") or {})
        self.straggle_p = float(stragglers.get("probability") or 0.0)
        self.straggle_work = float(stragglers.get("work", 0.5))
        deadline = faults.get("deadline_s")
        self.deadline_s = None if deadline is None else float(deadline)
        self.crashes = [(str(c["client"]), int(c["round"])) for c in faults.get("crash") or []]
        byz = dict(faults.get("byzantine") or {})
        self.byzantine = [str(c) for c in byz.get("clients") or []]
        self.attack = byz.get("attack", "sign_flip")
        self.scale = float(byz.get("scale", 10.0))
        self.sigma = float(byz.get("sigma", 1.0))
        unknown = sorted(set(self.byzantine + [c for c, _ in self.crashes]) - set(client_names))
        if unknown:
            raise ValueError(f"federated.faults names unknown client(s) {unknown}; "
                             f"the clients are {client_names}")
        if self.byzantine and self.attack not in ATTACKS and self.attack not in DATA_ATTACKS:
            raise ValueError(f"federated.faults.byzantine.attack '{self.attack}' unknown: "
                             f"one of {sorted(ATTACKS) + list(DATA_ATTACKS)}")
        if not 0.0 < self.straggle_work <= 1.0:
            raise ValueError("federated.faults.stragglers.work must be in (0, 1], got "
                             f"{self.straggle_work}")

    def _rng(self, rnd: int, client: int, what: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, rnd, client, what])

    def drops_out(self, rnd: int, client: int) -> bool:
        return self.dropout > 0 and self._rng(rnd, client, 1).random() < self.dropout

    def work(self, rnd: int, client: int) -> float:
        """Share of its local steps the client completes this round (1.0: all)."""
        straggles = self.straggle_p > 0 and self._rng(rnd, client, 2).random() < self.straggle_p
        return self.straggle_work if straggles else 1.0

    def crashes_now(self, name: str, rnd: int) -> bool:
        return (name, rnd) in self.crashes

    def flips_labels(self, name: str) -> bool:
        return name in self.byzantine and self.attack == "label_flip"

    def tamper(self, name: str, rnd: int, client: int, y: Weights, x: Weights) -> Weights:
        """The update a client sends: ``y`` when honest, the attacked one when Byzantine."""
        if name not in self.byzantine or self.attack not in ATTACKS:
            return y
        strength = self.sigma if self.attack == "gaussian" else self.scale
        return ATTACKS[self.attack](y, x, strength, self._rng(rnd, client, 3))
