"""Byzantine-robust rules: coordinate-wise median and trimmed mean (Yin et al., 2018),
(Multi-)Krum (Blanchard et al., 2017). Each needs every client's update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mer.federated import aggregators
from mer.federated.rules.base import RULES, Results, Rule
from mer.federated.state import Weights


@RULES.register("median")
class Median(Rule):
    """Coordinate-wise median; example counts are ignored."""

    name, needs_individual_updates, robust = "median", True, True

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        return aggregators.median(results)


@RULES.register("trimmed_mean")
class TrimmedMean(Rule):
    """Coordinate-wise mean without the ``rule.beta`` share at each end."""

    name, needs_individual_updates, robust = "trimmed_mean", True, True

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        return aggregators.trimmed_mean(results, float(rule["beta"]))


@RULES.register("krum")
class Krum(Rule):
    """(Multi-)Krum: the ``rule.num_to_keep`` best-scored updates, averaged."""

    name, needs_individual_updates, robust = "krum", True, True

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        return aggregators.krum(results, int(rule["num_malicious"]),
                                int(rule.get("num_to_keep", 1)))
