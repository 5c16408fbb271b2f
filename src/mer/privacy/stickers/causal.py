"""Causal discovery over facial sites: which site's motion drives the recogniser's output.

Variables: the motion of each sticker site (:mod:`mer.privacy.stickers.features`, log-scaled
and standardised) over a set of reference clips, and the recogniser's predicted emotion for
each clip (one black-box query per clip). For each class c, causal-learn's PC (or FCI) runs on
the sites plus the indicator ``[prediction == c]`` with Fisher-z tests, under the background
knowledge that a prediction causes no facial motion (edges from the indicator to a site are
forbidden). The sites adjacent to the indicator are its direct causes; each gets the size of
its effect, the absolute standardised coefficient of the site in the least-squares regression
of the indicator on all its direct causes. A site's score is the sum over classes of those
effects weighted by the class's share of predictions. The sticker goes on the site of the
largest score. When no site is found to be a direct cause of any class, the ranking falls back
to the largest absolute correlation with the indicators (``fallback`` and ``note`` say so).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("pc", "fci")


class CausalDiscoveryError(ValueError):
    """Too little or degenerate data for causal discovery; the message says what to change."""


@dataclass
class CausalRanking:
    """Result of :func:`causal_ranking`.

    Attributes:
        sites: site names, the columns of the features.
        scores: (S,) each site's causal score (0 when it is no direct cause of any class).
        order: site names, best first.
        causes: class name -> {site: effect} of that class's direct causes.
        fallback: no direct cause was found; ``order`` ranks by correlation instead.
        n: reference clips used; depth: the largest conditioning set tested.
    """

    sites: list[str]
    scores: np.ndarray
    order: list[str]
    causes: dict[str, dict[str, float]] = field(default_factory=dict)
    fallback: bool = False
    n: int = 0
    depth: int = 0
    note: str = ""

    @property
    def best(self) -> str:
        return self.order[0]

    def to_dict(self) -> dict:
        return {"sites": self.sites, "scores": [float(s) for s in self.scores],
                "order": self.order, "causes": self.causes, "fallback": self.fallback,
                "n": self.n, "depth": self.depth, "note": self.note}


def _standardise(features: np.ndarray) -> np.ndarray:
    z = np.log(np.asarray(features, dtype=np.float64) + 1e-3)
    sd = z.std(axis=0)
    return (z - z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _adjacent(graph: np.ndarray, target: int) -> list[int]:
    """Nodes with any edge to ``target`` in a causal-learn endpoint matrix."""
    return [j for j in range(graph.shape[0]) if j != target and
            (graph[j, target] != 0 or graph[target, j] != 0)]


def _discover(data: np.ndarray, alpha: float, method: str, depth: int) -> np.ndarray:
    """causal-learn's endpoint matrix over the columns of ``data``; the last column (the
    prediction indicator) may not cause any other; conditioning sets of at most ``depth``."""
    from causallearn.graph.GraphNode import GraphNode
    from causallearn.utils.PCUtils.BackgroundKnowledge import BackgroundKnowledge

    d = data.shape[1]
    names = [f"X{i + 1}" for i in range(d)]
    nodes = [GraphNode(n) for n in names]
    knowledge = BackgroundKnowledge()
    for j in range(d - 1):
        knowledge.add_forbidden_by_node(nodes[-1], nodes[j])
    if method == "pc":
        from causallearn.search.ConstraintBased.PC import pc

        cg = pc(data, alpha, "fisherz", background_knowledge=knowledge, show_progress=False,
                node_names=names, max_k=depth)
        return np.asarray(cg.G.graph)
    import contextlib
    import io

    from causallearn.search.ConstraintBased.FCI import fci

    with contextlib.redirect_stdout(io.StringIO()):  # FCI prints each oriented edge
        g, _ = fci(data, "fisherz", alpha, depth=depth, background_knowledge=knowledge,
                   show_progress=False, verbose=False, node_names=names)
    return np.asarray(g.graph)


def causal_ranking(features: np.ndarray, predictions: np.ndarray, sites: list[str],
                   class_names: list[str], alpha: float = 0.05, method: str = "pc",
                   depth: int | None = None) -> CausalRanking:
    """Rank sticker sites by their direct causal effect on the predicted emotion.

    Args:
        features: (N, S) per-site motion of N reference clips.
        predictions: (N,) predicted class indices for those clips.
        sites: S site names; class_names: K class names.
        alpha: significance level of the conditional-independence tests.
        method: ``pc`` or ``fci`` (causal-learn).
        depth: the largest conditioning set of the tests (None: all the other sites); capped
            at N - 4, what Fisher-z tests on N clips allow.

    Raises:
        CausalDiscoveryError: fewer than 5 clips, or a site column without variation.
        (Predictions of a single class leave nothing to explain: the ranking is then by mean
        motion, ``fallback`` set and ``note`` saying so.)
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(predictions, dtype=np.int64)
    if method not in METHODS:
        raise CausalDiscoveryError(f"unknown causal discovery method {method!r}; use one of "
                                   f"{list(METHODS)}")
    n, s = x.shape
    if n < 5:
        raise CausalDiscoveryError(f"causal discovery needs at least 5 reference clips, got "
                                   f"{n}: give the attacker more reference subjects "
                                   "(sticker_audit.split.reference)")
    depth = min(s if depth is None or depth < 0 else int(depth), n - 4)
    flat = [sites[j] for j in range(s) if np.ptp(x[:, j]) == 0]
    if flat:
        raise CausalDiscoveryError(f"site motion without variation over the reference clips: "
                                   f"{flat}; check the clips' flow and landmarks")
    present = sorted(set(y.tolist()))
    z = _standardise(x)
    if len(present) < 2:  # nothing to explain: the sites in order of their mean motion
        scores = x.mean(axis=0)
        order = [sites[j] for j in np.argsort(-scores, kind="stable")]
        note = (f"the recogniser predicted one class only ({class_names[present[0]]}) on the "
                f"{n} reference clips: no causal discovery; sites ranked by mean motion")
        return CausalRanking(list(sites), scores, order, {}, True, n, 0, note)
    scores = np.zeros(s)
    causes: dict[str, dict[str, float]] = {}
    for c in present:
        ind = (y == c).astype(np.float64)
        share = float(ind.mean())
        if share in (0.0, 1.0):
            continue
        col = (ind - ind.mean()) / ind.std()
        graph = _discover(np.column_stack([z, col]), alpha, method, depth)
        parents = _adjacent(graph, s)
        effects: dict[str, float] = {}
        if parents:
            coef, *_ = np.linalg.lstsq(z[:, parents], col, rcond=None)
            for j, b in zip(parents, coef):
                effects[sites[j]] = float(abs(b))
                scores[j] += share * abs(float(b))
        causes[class_names[c]] = effects
    fallback = not scores.any()
    if fallback:
        for c in present:
            ind = (y == c).astype(np.float64)
            corr = np.array([abs(np.corrcoef(z[:, j], ind)[0, 1]) for j in range(s)])
            scores += float(ind.mean()) * np.nan_to_num(corr)
    order = [sites[j] for j in np.argsort(-scores, kind="stable")]
    note = "no site is a direct cause of any class: sites ranked by correlation" \
        if fallback else ""
    return CausalRanking(list(sites), scores, order, causes, fallback, n, depth, note)
