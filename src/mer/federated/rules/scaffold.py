"""SCAFFOLD (Karimireddy et al., 2020), option II: control variates correct each client's
gradient for client drift; the server takes the unweighted mean of the sampled clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mer.federated import aggregators
from mer.federated.rules.base import RULES, ClientHooks, Results, Rule, zeros_like
from mer.federated.state import ClientState, ClientUpdate, Weights


class GradCorrection:
    """A module gradient hook: ``p.grad += correction[name]`` (= c - c_i) for each named
    parameter of the net, before every optimiser step."""

    def __init__(self, correction: dict[str, torch.Tensor]) -> None:
        self.correction = correction

    def __call__(self, net: torch.nn.Module) -> None:
        for name, p in net.named_parameters():
            if p.grad is not None and name in self.correction:
                p.grad.add_(self.correction[name].to(p.grad))


@RULES.register("scaffold")
class Scaffold(Rule):
    """State: the server control ``c`` (here) and each client's ``c_i`` (its ClientState,
    moved only when the server accepts its update)."""

    name, needs_individual_updates = "scaffold", True

    def __init__(self, fed, layout, fidelity, client_opt=None, num_clients=0) -> None:
        super().__init__(fed, layout, fidelity, client_opt, num_clients)
        self.server_control: Weights | None = None  # zeros like the model, set by the run

    def init_state(self, weights: Weights) -> None:
        self.server_control = zeros_like(weights)

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        """The paper's unweighted mean of the sampled clients."""
        return aggregators.weighted_mean([w for w, _ in results], [1.0] * len(results))

    def client_hooks(self, state: ClientState, start: Weights, anchor: list | None,
                     databases: set[str]) -> ClientHooks:
        control = state.control or [np.zeros_like(w) for w in self.server_control]
        names, params = self.layout.entry_names, self.layout.param_names
        correction = {n: torch.as_tensor(c - ci) for n, c, ci in
                      zip(names, self.server_control, control) if n in params}

        def finish(update: ClientUpdate, start: Weights) -> None:
            if update.steps <= 0:
                return
            # K plain SGD steps of the client optimiser's lr (client_optim.py)
            new = aggregators.scaffold_client_control(
                control, self.server_control, start, update.weights, update.steps,
                self.client_opt["lr"])
            new = [c if n in params else np.zeros_like(c) for n, c in zip(names, new)]
            update.control_delta = [a - b for a, b in zip(new, control)]
            update.new_control = new  # state.control moves once the server accepts

        return ClientHooks(grad_hooks=[GradCorrection(correction)], finish=finish)

    def server_update(self, rnd: int, accepted: list[ClientUpdate],
                      states: dict[str, ClientState]) -> None:
        """``c += |S|/N * mean dc_i``; the accepted clients keep their new ``c_i``
        (``flags["control_round"]`` = the round; over Flower the node keeps it and reads that
        flag). A late, excluded or dropped client's control stays as it was."""
        deltas = [u.control_delta for u in accepted if u.control_delta is not None]
        if deltas:
            mean_dc = aggregators.weighted_mean(deltas, [1.0] * len(deltas))
            frac = len(deltas) / self.num_clients
            self.server_control = [c + frac * d for c, d in zip(self.server_control, mean_dc)]
        for u in accepted:
            if u.control_delta is None:
                continue
            state = states[u.name]
            if u.new_control is not None:
                state.control = u.new_control
            state.flags["control_round"] = rnd

    def state_dict(self) -> dict:
        return {"server_control": self.server_control}

    def load_state_dict(self, state: dict) -> None:
        if state.get("server_control") is not None:
            self.server_control = state["server_control"]

    def round_content(self) -> dict[str, Weights]:
        return {"server_control": self.server_control}
