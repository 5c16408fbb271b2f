"""Aggregation rules: small pure functions over client updates.

In the spirit of Flower's strategies, the rules live apart from the orchestration that calls
them (``mer.federated.loop``). A model is a list of numpy arrays, one per state-dict entry in
a fixed order (``Weights``); a round's client results are ``list[tuple[Weights, int]]``
(weights, number of training examples).

Notation used in the docstrings: K clients, client k sends weights ``w_k`` (a list of L arrays)
trained on ``n_k`` examples, ``N = sum_k n_k``. Every rule works layer by layer and
coordinate-wise unless said otherwise.

Dtypes: arithmetic is done in float64 and each output layer is cast back to the dtype of the
first client's layer; integer layers (e.g. BatchNorm's ``num_batches_tracked``) are rounded to
the nearest integer. (Flower keeps numpy's promotion instead, so its integer layers come back
as float64; floating layers agree.)

Rules here never see garbage: run :func:`check_updates` first, which drops non-finite updates
and refuses incompatible state dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

Weights = list[np.ndarray]
ClientResult = tuple[Weights, int]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _cast_like(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to ``dtype`` (integers rounded to nearest)."""
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_):
        return np.rint(x).astype(dtype)
    return np.asarray(x, dtype=dtype)


def _require_results(results: Sequence[ClientResult], rule: str) -> None:
    if len(results) == 0:
        raise ValueError(f"{rule}: no client results to aggregate (were all excluded?)")


def _stack_layers(weights_list: Sequence[Weights]) -> list[np.ndarray]:
    """Per layer l, the (K, *shape_l) float64 stack of the K clients' arrays."""
    num_layers = {len(w) for w in weights_list}
    if len(num_layers) != 1:
        raise ValueError(
            f"clients sent different numbers of arrays {sorted(num_layers)}; "
            "run check_updates() first"
        )
    return [
        np.stack([np.asarray(a, dtype=np.float64) for a in layer]) for layer in zip(*weights_list)
    ]


def _dtypes(weights: Weights) -> list[np.dtype]:
    return [np.asarray(a).dtype for a in weights]


# --------------------------------------------------------------------------------------------
# means: FedAvg, FedProx, P-FedProx
# --------------------------------------------------------------------------------------------


def weighted_mean(weights_list: Sequence[Weights], coefficients: Sequence[float]) -> Weights:
    """Coefficient-weighted mean of K models, layer by layer.

    ``out_l = sum_k c_k * w_k,l / sum_k c_k``

    Args:
        weights_list: K models, each a list of L arrays with matching shapes.
        coefficients: K non-negative weights ``c_k`` (need not sum to 1; sum must be > 0).

    Returns:
        L arrays, shapes and dtypes of ``weights_list[0]``.
    """
    if len(weights_list) == 0:
        raise ValueError("weighted_mean: no models to average")
    if len(weights_list) != len(coefficients):
        raise ValueError(
            f"weighted_mean: {len(weights_list)} models but {len(coefficients)} coefficients"
        )
    c = np.asarray(coefficients, dtype=np.float64)
    if np.any(c < 0) or not np.isfinite(c).all():
        raise ValueError(f"weighted_mean: coefficients must be finite and >= 0, got {c}")
    total = c.sum()
    if total <= 0:
        raise ValueError("weighted_mean: coefficients sum to 0 (no examples?)")
    dtypes = _dtypes(weights_list[0])
    out = []
    for stack, dtype in zip(_stack_layers(weights_list), dtypes):
        mean = np.tensordot(c, stack, axes=(0, 0)) / total
        out.append(_cast_like(mean, dtype))
    return out


def fedavg(results: Sequence[ClientResult]) -> Weights:
    """FedAvg (McMahan et al., 2017): the example-weighted mean.

    ``w = sum_k n_k w_k / N``

    Args:
        results: K pairs (weights, n_k).

    Returns:
        The aggregated weights (L arrays).
    """
    _require_results(results, "fedavg")
    return weighted_mean([w for w, _ in results], [n for _, n in results])


def fedprox(results: Sequence[ClientResult]) -> Weights:
    """FedProx (Li et al., 2020) aggregation: identical to :func:`fedavg`.

    FedProx differs from FedAvg only in the client objective, which adds the proximal term
    ``mu/2 * ||w - w_global||^2`` (see :func:`mer.federated.fedprox.proximal_term`).
    """
    return fedavg(results)


def pfedprox_personalise(
    client_weights: list[Weights], num_examples: list[int], own: float = 0.9,
    mix: list[bool] | None = None,
) -> list[Weights]:
    """P-FedProx personalisation of FED-PsyAU (Li et al., 2025).

    Each client keeps most of its own model and mixes in the others' size-weighted mean:

    ``p_k = own * w_k + (1 - own) * sum_{j != k} n_j w_j / sum_{j != k} n_j``

    With a single client, ``p_0 = w_0``. ``mix`` (one flag per array): arrays flagged False
    are not mixed, each client keeps its own (``p_k = w_k`` there). mer mixes every entry,
    batch-norm statistics included; the authors' code mixes parameters only (their
    ``named_parameters()`` loop), so its clients keep their own BN buffers
    (``fidelity=official``).

    Args:
        client_weights: K models (each L arrays).
        num_examples: K example counts ``n_k``.
        own: share of the client's own model, in [0, 1] (0.9 in the paper).
        mix: L flags, or None to mix every array.

    Returns:
        K personalised models, in the input order.
    """
    k_clients = len(client_weights)
    if k_clients == 0:
        raise ValueError("pfedprox_personalise: no clients")
    if len(num_examples) != k_clients:
        raise ValueError(
            f"pfedprox_personalise: {k_clients} models but {len(num_examples)} example counts"
        )
    if not 0.0 <= own <= 1.0:
        raise ValueError(f"pfedprox_personalise: own must be in [0, 1], got {own}")
    if k_clients == 1:
        return [[np.array(a, copy=True) for a in client_weights[0]]]
    personalised = []
    for k in range(k_clients):
        others = [j for j in range(k_clients) if j != k]
        if sum(num_examples[j] for j in others) <= 0:
            raise ValueError(f"pfedprox_personalise: the clients other than #{k} hold no examples")
        other_mean = weighted_mean(
            [client_weights[j] for j in others], [num_examples[j] for j in others]
        )
        mixed = weighted_mean([client_weights[k], other_mean], [own, 1.0 - own])
        if mix is not None:
            if len(mix) != len(mixed):
                raise ValueError(f"pfedprox_personalise: {len(mix)} mix flags for "
                                 f"{len(mixed)} arrays")
            mixed = [m if flag else np.array(w, copy=True)
                     for m, w, flag in zip(mixed, client_weights[k], mix)]
        personalised.append(mixed)
    return personalised


# --------------------------------------------------------------------------------------------
# robust rules: median, trimmed mean, Krum / Multi-Krum
# --------------------------------------------------------------------------------------------


def median(results: Sequence[ClientResult]) -> Weights:
    """Coordinate-wise median (FedMedian, Yin et al., 2018); example counts are ignored.

    ``w[i] = median_k w_k[i]`` (mean of the two middle values when K is even).
    """
    _require_results(results, "median")
    weights_list = [w for w, _ in results]
    dtypes = _dtypes(weights_list[0])
    return [
        _cast_like(np.median(stack, axis=0), dtype)
        for stack, dtype in zip(_stack_layers(weights_list), dtypes)
    ]


def trimmed_mean(results: Sequence[ClientResult], beta: float) -> Weights:
    """Coordinate-wise trimmed mean (Yin et al., 2018; Flower's FedTrimmedAvg).

    For each coordinate, sort the K values, drop ``c = floor(beta * K)`` at each end and
    average the remaining ``K - 2c`` (unweighted; example counts are ignored).

    Args:
        results: K pairs (weights, n_k).
        beta: fraction cut at each end, in [0, 0.5).
    """
    _require_results(results, "trimmed_mean")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    weights_list = [w for w, _ in results]
    k_clients = len(weights_list)
    cut = int(beta * k_clients)
    dtypes = _dtypes(weights_list[0])
    out = []
    for stack, dtype in zip(_stack_layers(weights_list), dtypes):
        kept = np.sort(stack, axis=0)[cut : k_clients - cut]
        out.append(_cast_like(kept.mean(axis=0), dtype))
    return out


def krum_scores(weights_list: Sequence[Weights], num_malicious: int) -> np.ndarray:
    """Krum score of each client (Blanchard et al., 2017), shape (K,).

    With every model flattened into one vector ``v_k`` and ``m = max(1, K - f - 2)``,

    ``score_k = sum of the m smallest ||v_k - v_j||^2 over j != k``  (squared distances).
    """
    flat = np.stack(
        [np.concatenate([np.asarray(a, np.float64).ravel() for a in w]) for w in weights_list]
    )
    k_clients = len(weights_list)
    sq_dist = np.zeros((k_clients, k_clients))
    for i in range(k_clients):
        for j in range(i + 1, k_clients):
            diff = flat[i] - flat[j]  # direct differences: no cancellation as in the Gram trick
            sq_dist[i, j] = sq_dist[j, i] = diff @ diff
    num_closest = max(1, k_clients - num_malicious - 2)
    scores = np.empty(k_clients)
    for k in range(k_clients):
        others = np.sort(np.delete(sq_dist[k], k))
        scores[k] = others[:num_closest].sum()
    return scores


def krum(results: Sequence[ClientResult], num_malicious: int, num_to_keep: int = 1) -> Weights:
    """Krum (``num_to_keep=1``) or Multi-Krum (``num_to_keep > 1``), as Flower does them.

    Scores are those of :func:`krum_scores` (``m = max(1, K - f - 2)`` nearest neighbours,
    squared Euclidean distances over all layers flattened together).

    - Krum: return the weights of the client with the lowest score.
    - Multi-Krum: keep the ``num_to_keep`` lowest-scoring clients and return their
      **example-weighted** mean ``sum n_k w_k / sum n_k`` (Flower's ``aggregate_krum``).

    Flower's ``num_clients_to_keep=0`` (plain Krum) is ``num_to_keep=1`` here. Ties in score
    go to the lower client index. The Krum guarantee needs ``K >= 2f + 3``; as in Flower this
    is not enforced.
    """
    _require_results(results, "krum")
    k_clients = len(results)
    if num_malicious < 0:
        raise ValueError(f"krum: num_malicious must be >= 0, got {num_malicious}")
    if not 1 <= num_to_keep <= k_clients:
        raise ValueError(f"krum: num_to_keep must be in [1, {k_clients}], got {num_to_keep}")
    scores = krum_scores([w for w, _ in results], num_malicious)
    order = np.argsort(scores, kind="stable")
    if num_to_keep == 1:
        return [np.array(a, copy=True) for a in results[int(order[0])][0]]
    return fedavg([results[int(i)] for i in order[:num_to_keep]])


# --------------------------------------------------------------------------------------------
# FedBN
# --------------------------------------------------------------------------------------------


def fedbn_mask(names: list[str], model: nn.Module | None = None) -> list[bool]:
    """Which state-dict entries FedBN (Li et al., 2021) keeps local: the batch-norm ones.

    An entry is marked when it is a BN buffer (``running_mean``, ``running_var``,
    ``num_batches_tracked``) or a parameter (``weight``, ``bias``) of a batch-norm module.
    With ``model`` given, BN modules are found by type (any ``_BatchNorm``: BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy variants; this also catches BN layers without running statistics).
    Without it, a module counts as BN when it owns a ``running_mean`` entry in ``names``.

    Args:
        names: state-dict keys in the order of the ``Weights`` lists.
        model: the torch module whose ``state_dict()`` gave ``names`` (optional; keys must be
            relative to it, e.g. no extra ``model.`` prefix).

    Returns:
        One bool per name, True = keep local.
    """
    if model is not None:
        bn_prefixes = {
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        }
    else:
        bn_prefixes = {
            n.rsplit(".", 1)[0] if "." in n else "" for n in names if n.endswith("running_mean")
        }
    mask = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        mask.append(leaf in BN_BUFFER_SUFFIXES or prefix in bn_prefixes)
    return mask


def apply_fedbn(global_weights: Weights, local_weights: Weights, mask: list[bool]) -> Weights:
    """Model a FedBN client loads: local entries where ``mask`` is True, global elsewhere.

    ``out_l = local_l if mask_l else global_l``
    """
    if not len(global_weights) == len(local_weights) == len(mask):
        raise ValueError(
            f"apply_fedbn: lengths differ (global {len(global_weights)}, "
            f"local {len(local_weights)}, mask {len(mask)})"
        )
    out = []
    for g, loc, keep_local in zip(global_weights, local_weights, mask):
        if np.shape(g) != np.shape(loc):
            raise ValueError(f"apply_fedbn: shapes differ {np.shape(g)} vs {np.shape(loc)}")
        out.append(np.array(loc if keep_local else g, copy=True))
    return out


# --------------------------------------------------------------------------------------------
# sanity checks before aggregation
# --------------------------------------------------------------------------------------------


def check_updates(
    results: Sequence[ClientResult],
    client_ids: Sequence[str],
    reference: Weights | None = None,
) -> tuple[list[ClientResult], dict[str, str]]:
    """Drop non-finite updates; refuse incompatible ones. Run before every rule.

    - Shapes: every client must send as many arrays as the reference, each with the same
      shape. The reference is ``reference`` (e.g. the current global model) when given, else
      the first client. A mismatch means incompatible state dicts (a different model or
      config): raises ``ValueError`` naming the client.
    - Example counts: negative raises; zero excludes the client (it trained on nothing).
    - Values: an update with any NaN or +-inf is excluded and reported.

    Args:
        results: K pairs (weights, n_k).
        client_ids: K names, used in messages.
        reference: optional layout to compare against.

    Returns:
        ``(kept, excluded)``: the kept results in input order, and ``{client_id: reason}``
        for each excluded client.
    """
    if len(results) != len(client_ids):
        raise ValueError(f"check_updates: {len(results)} results but {len(client_ids)} ids")
    if len(results) == 0:
        return [], {}
    if reference is not None:
        ref_shapes, ref_name = [np.shape(a) for a in reference], "the global model"
    else:
        ref_shapes = [np.shape(a) for a in results[0][0]]
        ref_name = f"client {client_ids[0]!r}"
    kept: list[ClientResult] = []
    excluded: dict[str, str] = {}
    for cid, (weights, n) in zip(client_ids, results):
        shapes = [np.shape(a) for a in weights]
        if len(shapes) != len(ref_shapes):
            raise ValueError(
                f"client {cid!r} sent {len(shapes)} arrays, {ref_name} has {len(ref_shapes)}: "
                "incompatible state dicts (same model and config on every client?)"
            )
        for i, (s, r) in enumerate(zip(shapes, ref_shapes)):
            if s != r:
                raise ValueError(
                    f"client {cid!r}: array #{i} has shape {s}, {ref_name} has {r}: "
                    "incompatible state dicts (same model and config on every client?)"
                )
        if n < 0:
            raise ValueError(f"client {cid!r} reported a negative example count {n}")
        if n == 0:
            excluded[cid] = "no training examples"
            continue
        bad = [i for i, a in enumerate(weights) if not np.isfinite(np.asarray(a)).all()]
        if bad:
            excluded[cid] = f"non-finite values (NaN/inf) in array(s) {bad}"
            continue
        kept.append((weights, n))
    return kept, excluded


# --------------------------------------------------------------------------------------------
# SCAFFOLD (Karimireddy et al., 2020, Algorithm 1)
# --------------------------------------------------------------------------------------------


def scaffold_correction(grad: ArrayT, c_global: ArrayT, c_local: ArrayT) -> ArrayT:
    """Client-side corrected gradient of SCAFFOLD, one array/tensor at a time.

    ``g' = g(y) - c_i + c``, and the local step is ``y <- y - eta_l * g'``.
    Works on numpy arrays or torch tensors of one shape.
    """
    return grad - c_local + c_global


def scaffold_client_control(
    c_local: Weights,
    c_global: Weights,
    global_weights: Weights,
    local_weights: Weights,
    steps: int,
    lr: float,
) -> Weights:
    """New client control variate, SCAFFOLD option II.

    ``c_i+ = c_i - c + (x - y_i) / (K * eta_l)``

    with ``x`` the global model the round started from, ``y_i`` the client's model after
    ``K = steps`` local SGD steps of learning rate ``eta_l = lr``. The client then sends
    ``dy_i = y_i - x`` and ``dc_i = c_i+ - c_i``.
    """
    if steps <= 0 or lr <= 0:
        raise ValueError(f"scaffold_client_control: steps and lr must be > 0 ({steps}, {lr})")
    if not len(c_local) == len(c_global) == len(global_weights) == len(local_weights):
        raise ValueError("scaffold_client_control: the four lists differ in length")
    scale = 1.0 / (steps * lr)
    return [
        _cast_like(
            np.asarray(ci, np.float64)
            - np.asarray(c, np.float64)
            + scale * (np.asarray(x, np.float64) - np.asarray(y, np.float64)),
            np.asarray(ci).dtype,
        )
        for ci, c, x, y in zip(c_local, c_global, global_weights, local_weights)
    ]


def scaffold_server_update(
    global_weights: Weights,
    client_deltas_y: list[Weights],
    client_deltas_c: list[Weights],
    server_c: Weights,
    num_clients_total: int,
    lr_global: float = 1.0,
) -> tuple[Weights, Weights]:
    """SCAFFOLD server step over the S participating clients.

    ``dx = (1/S) sum_i dy_i``,  ``dc = (1/S) sum_i dc_i``  (unweighted, as in the paper)

    ``x <- x + eta_g * dx``,  ``c <- c + (S / N) * dc``

    with ``N = num_clients_total`` and ``eta_g = lr_global``.

    Returns:
        ``(new_global_weights, new_server_c)``.
    """
    num_sampled = len(client_deltas_y)
    if num_sampled == 0 or len(client_deltas_c) != num_sampled:
        raise ValueError(
            f"scaffold_server_update: need as many dy as dc, >= 1 "
            f"(got {num_sampled} and {len(client_deltas_c)})"
        )
    if not 0 < num_sampled <= num_clients_total:
        raise ValueError(
            f"scaffold_server_update: {num_sampled} clients sampled of {num_clients_total}"
        )
    ones = [1.0] * num_sampled
    mean_dy = weighted_mean(client_deltas_y, ones)
    mean_dc = weighted_mean(client_deltas_c, ones)
    new_x = [
        _cast_like(np.asarray(x, np.float64) + lr_global * d, np.asarray(x).dtype)
        for x, d in zip(global_weights, mean_dy, strict=True)
    ]
    frac = num_sampled / num_clients_total
    new_c = [
        _cast_like(np.asarray(c, np.float64) + frac * d, np.asarray(c).dtype)
        for c, d in zip(server_c, mean_dc, strict=True)
    ]
    return new_x, new_c


def fednova(current: Weights, results: Sequence[ClientResult],
            steps: Sequence[int]) -> Weights:
    """FedNova's normalised average (Wang et al., 2020), plain-SGD form.

    ``x+ = x - tau_eff * sum_i p_i (x - y_i) / tau_i`` with ``p_i = n_i / sum n``,
    ``tau_eff = sum_i p_i tau_i``. Floating entries only; integer buffers (batch-norm counters)
    take :func:`fedavg`. A client with 0 steps has not moved and is left out of the sums (its
    ``n_i`` still counts in ``p``).

    Args:
        current: the round's global model ``x``, L arrays.
        results: K ``(y_i, n_i)`` pairs.
        steps: K local step counts ``tau_i`` >= 0, at least one > 0.
    """
    _require_results(results, "fednova")
    if len(steps) != len(results) or any(int(t) < 0 for t in steps) or not any(steps):
        raise ValueError(f"fednova: need {len(results)} step counts >= 0, one > 0: {steps}")
    n = np.asarray([float(k) for _, k in results])
    p = n / n.sum()
    tau = np.asarray([float(t) for t in steps])
    tau_eff = float((p * tau).sum())
    mean = fedavg(results)
    out = []
    for layer, x in enumerate(current):
        if not np.issubdtype(np.asarray(x).dtype, np.floating):
            out.append(mean[layer])
            continue
        x64 = np.asarray(x, np.float64)
        d = sum(p_i * (x64 - np.asarray(w[layer], np.float64)) / t_i
                for (w, _), p_i, t_i in zip(results, p, tau) if t_i > 0)
        out.append(_cast_like(x64 - tau_eff * d, np.asarray(x).dtype))
    return out
