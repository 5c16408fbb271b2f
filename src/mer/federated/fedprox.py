"""FedProx client objective (Li et al., 2020): the proximal term.

The local loss becomes ``loss + proximal_term(params, global_params, mu)``; the server
aggregates as FedAvg (:func:`mer.federated.aggregators.fedprox`). FED-PsyAU's P-FedProx uses
the same term; its authors' code (``Fed_Framework/client.py``) adds the *unsquared* norm of
each parameter tensor instead (``norm="l2"``, used under ``fidelity=official``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


def proximal_term(
    params: Iterable[torch.Tensor],
    global_params: Iterable[torch.Tensor | np.ndarray],
    mu: float,
    norm: str = "squared",
) -> torch.Tensor:
    """``mu/2 * sum_l ||w_l - w_g,l||^2`` (squared L2 norm), a scalar tensor.

    Its gradient with respect to ``w_l`` is ``mu * (w_l - w_g,l)``; the global weights are
    constants (detached). Note: the example in Flower's FedProx docstring adds the plain norm
    ``||w - w_g||``; the paper (and this function) uses the squared norm.

    ``norm="l2"``: ``mu/2 * sum_l ||w_l - w_g,l||``, the unsquared norm of each tensor, as the
    FED-PsyAU authors' client computes it. Its gradient ``mu/2 * (w_l - w_g,l) / ||w_l -
    w_g,l||`` has the same size for a tensor however close it is to the anchor (and is 0 at the
    anchor itself, the subgradient torch's norm takes there).

    Args:
        params: the client's trainable tensors (e.g. ``model.parameters()``), any shapes.
        global_params: the round's global values, same order and shapes (tensors, or numpy
            arrays, converted on the fly; convert once per round for speed).
        mu: proximal weight, >= 0.

    Returns:
        0-dim tensor on the device and dtype of the first parameter.
    """
    if mu < 0:
        raise ValueError(f"proximal_term: mu must be >= 0, got {mu}")
    if norm not in ("squared", "l2"):
        raise ValueError(f"proximal_term: norm must be 'squared' or 'l2', got {norm!r}")
    params = list(params)
    global_params = list(global_params)
    if len(params) != len(global_params):
        raise ValueError(
            f"proximal_term: {len(params)} parameters but {len(global_params)} global values"
        )
    if not params:
        return torch.zeros(())
    total = torch.zeros((), device=params[0].device, dtype=params[0].dtype)
    for i, (w, g) in enumerate(zip(params, global_params)):
        g = torch.as_tensor(g, device=w.device, dtype=w.dtype).detach()
        if g.shape != w.shape:
            raise ValueError(
                f"proximal_term: parameter #{i} has shape {tuple(w.shape)}, global {tuple(g.shape)}"
            )
        diff = w - g
        total = total + (diff.pow(2).sum() if norm == "squared" else
                         torch.linalg.vector_norm(diff))
    return 0.5 * mu * total


class ProximalTerm:
    """A module loss term (``MERModule.loss_terms``): :func:`proximal_term` of the net's
    parameters towards ``anchor`` (tensors in ``net.parameters()`` order, copied)."""

    def __init__(self, mu: float, anchor: Iterable[torch.Tensor], norm: str = "squared") -> None:
        self.mu, self.norm = float(mu), norm
        self.anchor = [a.detach().clone() for a in anchor]

    def __call__(self, net: torch.nn.Module) -> torch.Tensor:
        return proximal_term(net.parameters(), self.anchor, self.mu, self.norm)
