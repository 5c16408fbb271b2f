"""Clients of a federated run: who holds which samples, and each client's own train/test split.

No sample and no subject is in two clients, and within a client no subject is on both sides
of its train/test split (``check_partition``).
"""

from __future__ import annotations

import zlib
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


def natural_clients(samples: FlowSamples, test_fraction: float = 0.3, seed: int = 0,
                    num_clients: int | None = None) -> list[ClientData]:
    """One client per database (a lab holds its own database), each split by subject.

    With ``num_clients`` larger than the number of databases, databases are split into
    subject-disjoint sites (``synA-1``, ``synA-2``...), allocated in proportion to their
    subject counts (largest remainder, at least one site each, two subjects per site): the
    non-IID structure between databases is kept.
    """
    databases = sorted(samples.meta["database"].unique())
    db_of = samples.meta["database"].to_numpy()
    keys = samples.meta["subject_key"].to_numpy()
    num_clients = len(databases) if num_clients is None else int(num_clients)
    if num_clients < len(databases):
        raise PartitionError(
            f"federated.num_clients={num_clients} but the natural partition has one client per "
            f"database ({len(databases)}: {databases}). Ask for at least {len(databases)} or "
            "use federated.partition.kind=iid|dirichlet|quantity.")
    counts = np.array([len(set(keys[db_of == db])) for db in databases])
    sites = [1] * len(databases) if num_clients == len(databases) else \
        _allocate_sites(counts, num_clients, databases)
    clients = []
    for db, n_sites in zip(databases, sites):
        # seeded by the database's name, not its position: a lab that loads its own database
        # alone (a Flower SuperNode) makes the split the whole federation's config makes
        i = zlib.crc32(str(db).encode())
        positions = np.flatnonzero(db_of == db)
        if n_sites == 1:
            groups = [(db, positions)]
        else:
            subjects = sorted(set(keys[positions]))
            subjects = np.random.default_rng([seed, i, 11]).permutation(subjects)
            groups = [(f"{db}-{j + 1}", positions[np.isin(keys[positions], subjects[j::n_sites])])
                      for j in range(n_sites)]
        for j, (name, pos) in enumerate(groups):
            rng = np.random.default_rng([seed, i] if n_sites == 1 else [seed, i, j])
            clients.append(_split_subjects(samples, pos, test_fraction, rng, name))
    return clients


def _allocate_sites(subject_counts: np.ndarray, num_clients: int, names: list[str]) -> list[int]:
    """Sites per database: proportional to subjects, >= 1 each, <= subjects // 2 each."""
    cap = subject_counts // 2
    if cap.sum() < num_clients:
        raise PartitionError(
            f"{num_clients} clients need 2 subjects each; the databases {names} have "
            f"{subject_counts.tolist()} subjects. Ask for at most {int(cap.sum())} clients.")
    share = subject_counts / subject_counts.sum() * num_clients
    sites = np.clip(np.floor(share).astype(int), 1, cap)
    while sites.sum() < num_clients:  # largest remainder among databases with room
        room = np.where(sites < cap, share - sites, -np.inf)
        sites[int(np.argmax(room))] += 1
    while sites.sum() > num_clients:
        over = np.where(sites > 1, sites - share, -np.inf)
        sites[int(np.argmax(over))] -= 1
    return sites.tolist()


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
