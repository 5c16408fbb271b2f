"""FedAvg (McMahan et al., 2017): the example-weighted mean; no client hook, no state."""

from __future__ import annotations

from mer.federated.rules.base import RULES, Rule


@RULES.register("fedavg")
class FedAvg(Rule):
    """The base rule as it stands."""

    name = "fedavg"
