"""FedNova-lite (Wang et al., 2020, "Tackling the objective inconsistency problem"): normalised
averaging for clients that take different numbers of local steps (stragglers, unequal data).

FedAvg weights each client's *total* change, so a client that took more steps pulls the model
further than its data share. FedNova averages each client's change per step and scales by the
clients' mean step count:

    d_i = (x - y_i) / tau_i,   p_i = n_i / sum_j n_j,   tau_eff = sum_i p_i tau_i,
    x+ = x - tau_eff * sum_i p_i d_i

with ``tau_i`` the client's optimiser steps. "Lite": the plain-SGD form (``a_i`` a vector of
ones, ``||a_i||_1 = tau_i``); with momentum or Adam at the clients it is the same heuristic
normalisation, not the paper's exact ``a_i``. Integer buffers take FedAvg's mean. The server
needs each client's step count next to its update, so the rule is refused where the server
sees only a sum. Added as the example of a new rule: this file and ``conf/federated/
fednova.yaml`` (plus its pure function :func:`mer.federated.aggregators.fednova`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mer.federated import aggregators
from mer.federated.rules.base import RULES, Results, Rule
from mer.federated.state import ClientUpdate, Weights


@RULES.register("fednova")
class FedNova(Rule):
    name, needs_individual_updates = "fednova", True

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        raise TypeError("fednova aggregates client updates with their step counts: use "
                        "aggregate_updates(updates, current)")

    def aggregate_updates(self, updates: list[ClientUpdate], current: Weights) -> Weights:
        return aggregators.fednova(current, [(u.weights, u.num_examples) for u in updates],
                                   [u.steps for u in updates])
