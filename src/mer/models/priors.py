"""AU-relation priors of FED-PsyAU: a psychological prior (a graph) and a data prior (counts).

**Psychological prior.** FED-PsyAU (Li, Qian, Zhao, Wang, ICCV 2025) builds its AU graph from
a psychological study of how facial action units are coordinated in micro-expressions. Within
the upper face AU1, AU2, AU4 and AU5 are linked to one another except AU4-AU5, and AU6-AU7 are
linked; within the lower face AU9-AU10, AU12-AU14 and AU15-AU17. Across the face the study
found upper -> lower coordinated pairs (``GLOBAL_EDGES``). Nodes are the 12 AUs of
:data:`mer.data.aus.PSYAU_AUS`, in that order: the first six are upper-face, the last six
lower-face.

**Data prior.** A row-normalised AU co-occurrence matrix counted from the *training*
annotations of a fold (or, federated, summed over clients' counts and normalised once on the
server): :func:`cooccurrence_counts` then :func:`data_prior`.

**Fidelity.** ``fidelity="official"`` reproduces the authors' released code (MELABIPCAS/
FED-PsyAU, ``Fed_Framework/models/au_graph_mer.py``): its global graph also has the directed
entry AU9 -> AU2 (:data:`OFFICIAL_EXTRA_EDGES`), and its upper / lower priors are the blocks of
the global prior renormalised per row (:func:`level_prior`). mer's default (``"mer"``) keeps
the symmetric graph of the paper and the raw blocks; see the README's fidelity table.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from mer.data.aus import PSYAU_AUS

UPPER_AUS: tuple[int, ...] = PSYAU_AUS[:6]  # 1, 2, 4, 5, 6, 7
LOWER_AUS: tuple[int, ...] = PSYAU_AUS[6:]  # 9, 10, 12, 14, 15, 17

# Undirected edges within each half of the face.
UPPER_EDGES: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 4), (2, 4), (1, 5), (2, 5),  # AU1-AU2-AU4-AU5 linked, but not AU4-AU5
    (6, 7),
)
LOWER_EDGES: tuple[tuple[int, int], ...] = ((9, 10), (12, 14), (15, 17))

# Upper -> lower coordinated pairs; the global graph uses them in both directions.
GLOBAL_EDGES: tuple[tuple[int, int], ...] = (
    (1, 12), (1, 14), (1, 15),
    (2, 12), (2, 14), (2, 15), (2, 17),
    (4, 9), (4, 10), (4, 14), (4, 15), (4, 17),
    (5, 12),
    (6, 9), (6, 12), (6, 14),
    (7, 9), (7, 10), (7, 12), (7, 14), (7, 15), (7, 17),
)

# Directed entries of the authors' global adjacency that the paper's graph lacks: (target,
# source), i.e. row AU9 has a 1 in column AU2 (AU9 attends to AU2; AU2 does not attend to AU9).
OFFICIAL_EXTRA_EDGES: tuple[tuple[int, int], ...] = ((9, 2),)

Scope = Literal["upper", "lower", "global", "flat"]
Fidelity = Literal["mer", "official"]
FIDELITIES: tuple[str, ...] = ("mer", "official")
_EDGES: dict[str, tuple[tuple[int, int], ...]] = {
    "upper": UPPER_EDGES, "lower": LOWER_EDGES, "global": GLOBAL_EDGES,
    "flat": UPPER_EDGES + LOWER_EDGES + GLOBAL_EDGES,
}


def check_fidelity(fidelity: str) -> None:
    """Raise ValueError unless ``fidelity`` is ``mer`` or ``official``."""
    if fidelity not in FIDELITIES:
        raise ValueError(f"unknown fidelity {fidelity!r}: 'mer' (default) or 'official' (the "
                         "FED-PsyAU authors' code); set fidelity=mer|official")


def psych_adjacency(scope: Scope = "flat", fidelity: Fidelity = "mer") -> torch.Tensor:
    """(12, 12) float {0, 1} adjacency over PSYAU_AUS with self-loops on all nodes; entry
    [i, j] = 1: node i attends to node j.

    ``upper`` / ``lower``: the edges within that half (the other half's nodes keep only their
    self-loops); ``global``: the upper <-> lower coordinated pairs; ``flat``: all edges in one
    graph. Symmetric, except under ``fidelity="official"``, where the global (and flat) graph
    also has the authors' directed entry AU9 -> AU2 (:data:`OFFICIAL_EXTRA_EDGES`).
    """
    if scope not in _EDGES:
        raise ValueError(f"unknown scope {scope!r}: upper, lower, global or flat")
    check_fidelity(fidelity)
    index = {au: i for i, au in enumerate(PSYAU_AUS)}
    adj = torch.eye(len(PSYAU_AUS))
    for a, b in _EDGES[scope]:
        adj[index[a], index[b]] = adj[index[b], index[a]] = 1.0
    if fidelity == "official" and scope in ("global", "flat"):
        for target, source in OFFICIAL_EXTRA_EDGES:
            adj[index[target], index[source]] = 1.0
    return adj


def level_prior(prior: torch.Tensor, nodes: tuple[int, ...] | list[int],
                renormalise: bool) -> torch.Tensor:
    """The prior one graph level reads: (12, 12) -> (12, 12).

    ``renormalise=False`` (mer): ``prior`` unchanged (the level reads its raw block).
    ``renormalise=True`` (the authors' code): within the block ``nodes x nodes`` each row is
    divided by its sum over the block, ``P[i, j] / sum_{k in nodes} P[i, k]``, so the level's
    rows are distributions over its own nodes (a row with zero block sum stays zero); entries
    outside the block are unchanged (the level never reads them). Node ids index PSYAU_AUS.
    """
    if not renormalise:
        return prior
    idx = torch.as_tensor(list(nodes), dtype=torch.long, device=prior.device)
    block = prior[idx][:, idx]
    total = block.sum(dim=1, keepdim=True)
    block = torch.where(total > 0, block / total.clamp(min=1e-12), torch.zeros_like(block))
    out = prior.clone()
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = block
    return out


def cooccurrence_counts(
    au: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
) -> torch.Tensor:
    """(12, 12) float64 counts: entry (i, j) = number of samples with both AU i and AU j.

    Args:
        au: (N, 12) multi-hot over PSYAU_AUS (values > 0.5 count as present).
        mask: (N,) bool, True for samples whose AUs are annotated; None means all. Samples with
            mask False are left out (their rows of ``au`` are never read as labels).

    The diagonal holds how many samples show each AU. Counts add up over disjoint sample sets,
    so a federated server can sum its clients' counts and call :func:`data_prior` once.
    """
    a = torch.as_tensor(au).double()
    if a.ndim != 2 or a.shape[1] != len(PSYAU_AUS):
        raise ValueError(f"au must be (N, {len(PSYAU_AUS)}) multi-hot, got {tuple(a.shape)}")
    if mask is not None:
        m = torch.as_tensor(mask).bool()
        if m.shape != (a.shape[0],):
            raise ValueError(f"mask must be ({a.shape[0]},) bool, got {tuple(m.shape)}")
        a = a[m]
    a = (a > 0.5).double()
    return a.T @ a


def data_prior(counts: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(12, 12) float32 row-normalised co-occurrence: row i is P(j | i) over j, summing to 1.

    Row i is counts[i] / counts[i].sum(), proportional to P(AU j present | AU i present) =
    counts[i, j] / counts[i, i]. A row with no count (AU i never annotated in the training
    data) is all zeros; the attention layer then takes a softmax of equal values over the
    node's neighbours, i.e. the prior is uniform there.
    """
    c = torch.as_tensor(counts).double()
    total = c.sum(dim=1, keepdim=True)
    return torch.where(total > 0, c / total.clamp(min=1e-12), torch.zeros_like(c)).float()
