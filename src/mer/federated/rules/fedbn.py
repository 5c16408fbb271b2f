"""FedBN (Li et al., 2021): FedAvg, but every client keeps its own batch-norm entries."""

from __future__ import annotations

from mer.federated import aggregators
from mer.federated.rules.base import RULES, Rule
from mer.federated.state import ClientState, Weights


@RULES.register("fedbn")
class FedBN(Rule):
    """A client starts from the global model with its own last BN entries (after its first
    round); the server averages everything as FedAvg."""

    name = "fedbn"

    def start_weights(self, base: Weights, state: ClientState) -> Weights:
        if state.last is None:
            return base
        return aggregators.apply_fedbn(base, state.last, self.layout.bn_mask)
