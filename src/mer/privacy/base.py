"""The common interface of the secure aggregation schemes (CKKS encryption, pairwise masks).

A round under secure aggregation, for clients k = 1..K with weights ``w_k`` (L arrays, the
``Weights`` of :mod:`mer.federated.aggregators`) trained on ``n_k`` examples::

    agg.begin_round(rnd, client_ids, template)       # keys / masks for this round
    payload_k = agg.client_payload(k, w_k, n_k)      # client side: bytes, never plaintext
    total = agg.server_sum({k: payload_k, ...})      # server side: only sees payloads
    mean = agg.finish(total, survivors)              # key holder / unmasking: sum n_k w_k / N

No sum of fewer than ``min_clients`` contributors is ever opened: :meth:`decode_sum` raises
:class:`TooFewContributors`, and the loop skips the round (global model unchanged).

Every model is flattened into one float64 vector ``[n_k * w_k (all layers, state-dict order),
n_k]``: the example count travels in the last slot, so the sum carries ``N = sum n_k`` and
the server never sees an individual count either. :meth:`SecureAggregation.decode_sum`
gives ``(sum_k n_k w_k, N)``; :func:`personalise_from_sum` turns it into the P-FedProx model
of one client without the server ever seeing another client's model.

The same path sums the other per-lab figures the server needs (:meth:`sum_vectors`, one
vector ``v_k`` per lab sent as ``[1 * v_k, 1]``): the AU co-occurrence counts of the labs'
training splits (DPK-GAT's data prior) and the labs' confusion matrices on their test splits
(the pooled UF1 / UAR). What is *not* protected, and so still reaches the server, is listed
in :mod:`mer.privacy.exposure` (and README's table): the labs' names, which lab took part in
which round and when its replies arrived; under ``privacy.disclose_per_lab=true`` each lab's
own confusion matrix (an opt-in). ``central_dp`` and ``dp`` are no secure aggregation: under
``central_dp`` the server receives every lab's update in plaintext and clips and noises the
mean itself (it protects the released model, not the updates); under ``dp`` each update is
DP-SGD-noised at its lab but still reaches the server in plaintext, with its example count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Weights = list[np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of a model's arrays (public: the architecture is known to all)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    sizes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    rounded: tuple[bool, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: layouts are consulted on every payload and decode of every round.
        object.__setattr__(self, "sizes", tuple(int(np.prod(s, dtype=np.int64))
                                                for s in self.shapes))
        object.__setattr__(self, "rounded", tuple(
            bool(np.issubdtype(d, np.integer) or np.issubdtype(d, np.bool_))
            for d in self.dtypes))

    @classmethod
    def of(cls, weights: Weights) -> Layout:
        return cls(tuple(np.shape(a) for a in weights),
                   tuple(np.asarray(a).dtype for a in weights))

    @property
    def size(self) -> int:
        """Number of scalars in the model (not counting the example-count slot)."""
        return sum(self.sizes)

    def check(self, weights: Weights, who: str) -> None:
        shapes = tuple(np.shape(a) for a in weights)
        if shapes != self.shapes:
            raise ValueError(f"{who}: the model's layout differs from the round's template "
                             f"({len(shapes)} arrays vs {len(self.shapes)}); a different model "
                             "or config?")


def flatten(weights: Weights) -> np.ndarray:
    """L arrays -> one float64 vector (D,), state-dict order."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in weights])


def unflatten(flat: np.ndarray, layout: Layout) -> Weights:
    """(D,) float64 -> L arrays with the layout's shapes and dtypes (integers rounded)."""
    if flat.shape != (layout.size,):
        raise ValueError(f"unflatten: {flat.shape} values for a model of {layout.size}")
    out, start = [], 0
    for shape, dtype, size, rounded in zip(layout.shapes, layout.dtypes, layout.sizes,
                                           layout.rounded):
        part = flat[start:start + size].reshape(shape)
        out.append((np.rint(part) if rounded else part).astype(dtype))
        start += size
    return out


def weighted_vector(weights: Weights, n: int) -> np.ndarray:
    """The vector a client aggregates: ``[n * flatten(w), n]``, shape (D + 1,)."""
    if n < 0:
        raise ValueError(f"example count must be >= 0, got {n}")
    return np.append(flatten(weights) * float(n), float(n))


class TooFewContributors(ValueError):
    """A protected aggregate of fewer contributors than ``privacy.min_clients`` (or than a
    protocol's threshold): the round is skipped and the sum never opened, never an abort."""


def require_contributors(count: int, min_clients: int, who: str) -> None:
    """Raise :class:`TooFewContributors` when ``count < min_clients``."""
    if count < min_clients:
        raise TooFewContributors(
            f"{who}: {count} contributor(s) < privacy.min_clients={min_clients}: a sum of so "
            "few would expose individual updates; the round is skipped (global model "
            "unchanged)")


def check_finite(weights: Weights, who: str) -> None:
    """Refuse NaN / inf in a model before it is protected (a range check alone lets NaN
    through: ``nan >= bound`` is False)."""
    for i, a in enumerate(weights):
        bad = ~np.isfinite(np.asarray(a, np.float64))
        if bad.any():
            raise ValueError(f"{who}: non-finite values in array {i} (shape "
                             f"{np.shape(a)}, {int(bad.sum())} of them, first at flat index "
                             f"{int(np.flatnonzero(bad)[0])}); the update diverged: check the "
                             "learning rate, or leave this client out of the round")


class SecureAggregation(ABC):
    """Example-weighted sum of client models where the server sees no individual update.

    Subclasses keep the client-side secrets (keys, seeds) apart from what the server holds;
    :meth:`server_sum` uses only the payloads and public material.
    """

    name: str = "secure"

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.round_clients: list[str] = []
        self.rnd = 0

    def begin_round(self, rnd: int, client_ids: Sequence[str], template: Weights) -> None:
        """Start round ``rnd`` with the selected clients; ``template`` gives the layout (e.g.
        the global model; only its shapes and dtypes are used)."""
        if len(set(client_ids)) != len(client_ids):
            raise ValueError(f"{self.name}: duplicate client ids {list(client_ids)}")
        self.rnd, self.round_clients = int(rnd), [str(c) for c in client_ids]
        self.layout = Layout.of(template)

    @property
    def min_clients(self) -> int:
        """The fewest contributors whose sum may be opened (``privacy.min_clients``)."""
        return int(getattr(getattr(self, "params", None), "min_clients", 3))

    @property
    def disclose_per_lab(self) -> bool:
        """``privacy.disclose_per_lab``: each lab also sends its own confusion matrix in
        plaintext (per-lab results at the server; an opt-in disclosure, off by default)."""
        return bool(getattr(getattr(self, "params", None), "disclose_per_lab", False))

    def sum_vectors(self, rnd: int, vectors: Mapping[str, np.ndarray]
                    ) -> tuple[np.ndarray, int]:
        """In-process: every lab protects its vector ``v_k`` (D,) as ``[v_k, 1]`` through this
        scheme, the server adds the payloads, and the sum is opened for ``min_clients`` labs
        or more (else :class:`TooFewContributors`). Returns ``(sum_k v_k (D,), labs)``.
        Over Flower the nodes protect their own vectors (``mer.federated.flower_app``)."""
        ids = [str(c) for c in vectors]
        require_contributors(len(ids), self.min_clients, f"{self.name} sum {rnd}")
        length = len(next(iter(vectors.values())))
        self.begin_round(rnd, ids, vector_template(length))
        payloads = {c: self.client_payload(c, [np.asarray(v, np.float64)], 1)
                    for c, v in zip(ids, vectors.values())}
        total = self.server_sum(payloads)
        flat, count = self.decode_sum(total, ids)
        return flat, int(round(count))

    def _require_client(self, client_id: str) -> None:
        if self.layout is None:
            raise RuntimeError(f"{self.name}: call begin_round() before client_payload()")
        if client_id not in self.round_clients:
            raise ValueError(f"{self.name}: client {client_id!r} was not selected for round "
                             f"{self.rnd} (selected: {self.round_clients})")

    @abstractmethod
    def client_payload(self, client_id: str, weights: Weights, n: int) -> bytes:
        """Client side: the protected form of ``[n * w, n]`` that goes to the server."""

    @abstractmethod
    def server_sum(self, payloads: Mapping[str, bytes]) -> bytes:
        """Server side: the protected sum of the payloads it received (client id -> bytes)."""

    @abstractmethod
    def decode_sum(self, sum_payload: bytes, survivors: Sequence[str]) -> tuple[np.ndarray, float]:
        """Recover ``(sum_k n_k flatten(w_k) (D,), N)`` over the ``survivors`` (the clients
        whose payloads went into ``sum_payload``)."""

    def finish(self, sum_payload: bytes, survivors: Sequence[str]) -> Weights:
        """The example-weighted mean ``sum_k n_k w_k / N`` over the survivors (FedAvg/FedProx)."""
        total, count = self.decode_sum(sum_payload, survivors)
        return mean_from_sum(total, count, self.layout, f"{self.name}: survivors {list(survivors)}")


def vector_template(length: int) -> Weights:
    """The layout of a plain vector of ``length`` values sent through :meth:`sum_vectors`."""
    return [np.zeros(int(length), np.float64)]


def mean_from_sum(total: np.ndarray, count: float, layout: Layout, who: str) -> Weights:
    """``sum_k n_k w_k`` (D,) and ``N`` -> the example-weighted mean model."""
    if count <= 0.5:
        raise ValueError(f"{who}: the sum holds no examples")
    return unflatten(total / round(count), layout)


def personalise_from_sum(own_weights: Weights, own_n: int, total: np.ndarray, count: float,
                         layout: Layout, own: float = 0.9) -> Weights:
    """P-FedProx model of one client from the decoded sum, computed by that client.

    ``p_k = own * w_k + (1 - own) * (S - n_k w_k) / (N - n_k)`` with ``S = sum_j n_j w_j``
    and ``N = sum_j n_j`` (as :func:`mer.federated.aggregators.pfedprox_personalise`).
    With no other client in the sum, ``p_k = w_k``.
    """
    n_total = round(count)
    others_n = n_total - int(own_n)
    w = flatten(own_weights)
    if others_n <= 0:
        return unflatten(w, layout)
    others_mean = (total - own_n * w) / others_n
    return unflatten(own * w + (1.0 - own) * others_mean, layout)
