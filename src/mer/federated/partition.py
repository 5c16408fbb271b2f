"""Clients of a federated run: who holds which samples, and each client's own train/test split.

No sample and no subject is in two clients, and within a client no subject is on both sides
of its train/test split (``check_partition``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.data.samples import FlowSamples


class PartitionError(ValueError):
    """A partition that cannot be made or is not clean."""


@dataclass
class ClientData:
    """One client: positions into the shared FlowSamples (its own data only)."""

    name: str
    train_idx: np.ndarray
    test_idx: np.ndarray


def _split_subjects(samples: FlowSamples, positions: np.ndarray, test_fraction: float,
                    rng: np.random.Generator, name: str) -> ClientData:
    keys = samples.meta["subject_key"].to_numpy()
    subjects = sorted(set(keys[positions]))
    if len(subjects) < 2:
        raise PartitionError(
            f"client {name}: {len(subjects)} subject(s); a subject-disjoint train/test split "
            "needs at least 2. Use fewer clients or a larger database.")
    n_test = min(len(subjects) - 1, max(1, int(round(test_fraction * len(subjects)))))
    test_subjects = set(rng.choice(subjects, n_test, replace=False))
    in_test = np.isin(keys[positions], list(test_subjects))
    return ClientData(name, positions[~in_test], positions[in_test])


def natural_clients(samples: FlowSamples, test_fraction: float = 0.3,
                    seed: int = 0) -> list[ClientData]:
    """One client per database (a lab holds its own database), each split by subject."""
    clients = []
    for i, db in enumerate(sorted(samples.meta["database"].unique())):
        positions = np.flatnonzero(samples.meta["database"].to_numpy() == db)
        clients.append(_split_subjects(samples, positions, test_fraction,
                                       np.random.default_rng([seed, i]), db))
    return clients


def subject_clients(samples: FlowSamples, num_clients: int, kind: str = "iid",
                    alpha: float = 0.5, test_fraction: float = 0.3,
                    seed: int = 0) -> list[ClientData]:
    """Subject-disjoint clients carved from the samples (one database or a pool).

    kinds: ``iid`` (subjects shuffled and dealt round-robin); ``dirichlet`` (label skew: each
    class has client proportions drawn from Dir(alpha) and a subject goes to a client drawn by
    the proportions of its majority class); ``quantity`` (client shares of the subjects drawn
    from Dir(alpha)). Every client gets at least 2 subjects so it can hold a test subject.
    """
    keys = samples.meta["subject_key"].to_numpy()
    subjects = sorted(set(keys))
    if num_clients < 1 or 2 * num_clients > len(subjects):
        raise PartitionError(
            f"{num_clients} clients need at least {2 * num_clients} subjects (2 each, for a "
            f"subject-disjoint train/test split); the data has {len(subjects)}. Ask for at most "
            f"{len(subjects) // 2} clients.")
    rng = np.random.default_rng([seed, 7])
    order = list(rng.permutation(subjects))
    owner: dict[str, int] = {s: i % num_clients for i, s in enumerate(order[:2 * num_clients])}
    rest = order[2 * num_clients:]  # two subjects each first, then the kind decides the rest
    if kind == "iid":
        owner.update({s: i % num_clients for i, s in enumerate(rest)})
    elif kind == "quantity":
        share = rng.dirichlet(np.full(num_clients, alpha))
        owner.update({s: int(rng.choice(num_clients, p=share)) for s in rest})
    elif kind == "dirichlet":
        labels = samples.labels
        proportions = rng.dirichlet(np.full(num_clients, alpha), size=samples.num_classes)
        for s in rest:
            major = int(np.bincount(labels[keys == s], minlength=samples.num_classes).argmax())
            owner[s] = int(rng.choice(num_clients, p=proportions[major]))
    else:
        raise PartitionError(f"unknown partition '{kind}': natural, iid, dirichlet, quantity")
    clients = []
    for k in range(num_clients):
        mine = [s for s in subjects if owner[s] == k]
        positions = np.flatnonzero(np.isin(keys, mine))
        clients.append(_split_subjects(samples, positions, test_fraction,
                                       np.random.default_rng([seed, k]), f"client{k}"))
    return clients


def check_partition(samples: FlowSamples, clients: list[ClientData]) -> None:
    """Raise PartitionError if a sample or subject is in two clients or on both sides."""
    keys = samples.meta["subject_key"].to_numpy()
    owner: dict[str, str] = {}
    seen = np.zeros(len(keys), dtype=bool)
    for c in clients:
        if len(c.train_idx) == 0:
            raise PartitionError(f"client {c.name} has no training samples")
        for idx in (c.train_idx, c.test_idx):
            if seen[idx].any():
                raise PartitionError(f"client {c.name}: a sample is already in another client")
            seen[idx] = True
        for key in set(keys[np.concatenate([c.train_idx, c.test_idx])]):
            if owner.setdefault(key, c.name) != c.name:
                raise PartitionError(f"subject {key} is in clients {owner[key]} and {c.name}")
        if set(keys[c.train_idx]) & set(keys[c.test_idx]):
            raise PartitionError(f"client {c.name}: a subject is on both sides of its split")
