"""FedProx (Li et al., 2020) and FED-PsyAU's P-FedProx: a proximal term in each client's
objective, FedAvg's mean at the server (P-FedProx adds ``federated.personalise``, which the
base rule applies)."""

from __future__ import annotations

from mer.federated.fedprox import ProximalTerm
from mer.federated.rules.base import RULES, ClientHooks, Rule
from mer.federated.state import ClientState, Weights


@RULES.register("fedprox")
class FedProx(Rule):
    """``mu/2 ||w - anchor||^2`` (``fidelity=official``: the unsquared norm per tensor, mu per
    database); the anchor is the round's global model (official: the initial one)."""

    name = "fedprox"
    proximal = True

    def anchor_weights(self, global_weights: Weights, initial: Weights) -> Weights | None:
        if not self.fidelity.any_mu:
            return None
        # initial: the authors' server never updates its model
        return initial if self.fidelity.prox_anchor == "initial" else global_weights

    def client_hooks(self, state: ClientState, start: Weights, anchor: list | None,
                     databases: set[str]) -> ClientHooks:
        mu = self.fidelity.mu_for(databases)
        if anchor is None or not mu:
            return ClientHooks()
        return ClientHooks(loss_terms=[ProximalTerm(mu, anchor, self.fidelity.prox_norm)])
