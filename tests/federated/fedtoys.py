"""Toy federated data and configs shared by the federated tests (imported, not a test)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from mer.data.samples import FlowSamples


def toy_samples(n_db: int = 3, n_subjects: int = 5, per_subject: int = 3,
                learnable: bool = False, seed: int = 0) -> FlowSamples:
    """``n_db`` databases x ``n_subjects`` x ``per_subject`` clips of 3x28x28 'flow'.

    With ``learnable`` each class lights up its own channel (plus noise), so a few epochs of
    STSTNet separate the classes; otherwise the images are zeros.
    """
    rows = [{"database": f"db{d}", "subject": f"s{s}", "clip": f"c{c}", "label": (s + c) % 3}
            for d in range(n_db) for s in range(n_subjects) for c in range(per_subject)]
    x = np.zeros((len(rows), 3, 28, 28), np.float32)
    if learnable:
        rng = np.random.default_rng(seed)
        x = rng.random(x.shape, dtype=np.float32) * 0.5
        for i, r in enumerate(rows):
            x[i, r["label"], 8:20, 8:20] += 1.0
    return FlowSamples(x, pd.DataFrame(rows), ["a", "b", "c"])


def fed_cfg(seed: int = 0, rule: dict | None = None, lr: float = 1e-2, **federated) -> object:
    """A small in-process federated config (STSTNet, FedAvg, batch 8, 1 local epoch)."""
    fed = {"rule": rule or {"name": "fedavg"}, "mu": 0.0, "personalise": None,
           "server_opt": {"name": "sgd", "lr": 1.0, "momentum": 0.0}, "rounds": 2,
           "eval_every": 1, "local_epochs": 1, "fraction": 1.0, "min_clients": 1,
           "faults": {}, "partition": {"kind": "natural", "test_fraction": 0.3},
           "num_clients": None, "baselines": False}
    fed.update(federated)
    return OmegaConf.create({
        "seed": seed, "resume": False, "data": {"batch_size": 8, "shuffle": True},
        "trainer": {"accelerator": "cpu", "devices": 1, "deterministic": True},
        "model": {"name": "ststnet", "lr": lr, "weight_decay": 0.0, "optimizer": "adam",
                  "kwargs": {}},
        "federated": fed,
    })
