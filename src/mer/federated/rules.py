"""Federated rules by name (``federated.rule.name``): one entry per strategy in :data:`RULES`.

Each entry holds the server-side aggregation over the pure functions of
:mod:`mer.federated.aggregators` and what the loop and the config check need to know of the
rule: ``needs_individual_updates`` (a rule that must see each client's update cannot run under
secure aggregation or central DP, where the server gets only a sum or a noised mean) and
``robust`` (a Byzantine-robust rule). The client-side hooks (FedProx's term, SCAFFOLD's
correction, FedBN's kept entries) are still in :mod:`mer.federated.loop`; the rule classes of
issue 14 take them over behind these same names.

A new stateless rule: a function here decorated with :func:`register_rule` and one
``conf/federated/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mer.federated import aggregators
from mer.registry import Registry

Weights = list[np.ndarray]
Results = Sequence[tuple[Weights, int]]
Aggregate = Callable[[Mapping[str, Any], Results], Weights]


@dataclass(frozen=True)
class FederatedRule:
    """A registered rule: ``aggregate(rule_cfg, [(weights, num_examples)])`` -> new weights."""

    name: str
    aggregate: Aggregate
    needs_individual_updates: bool
    robust: bool = False


RULES: Registry[FederatedRule] = Registry(
    "federated rule", hint="federated=<rule file> or federated.rule.name=<name>",
    error=ValueError)


def register_rule(name: str, needs_individual_updates: bool, robust: bool = False):
    """Decorator registering an aggregation function ``(rule_cfg, results) -> weights`` as
    rule ``name``."""

    def add(fn: Aggregate) -> Aggregate:
        RULES.register(name, FederatedRule(name, fn, needs_individual_updates, robust))
        return fn

    return add


def rule_names(robust: bool | None = None, private: bool | None = None) -> tuple[str, ...]:
    """Registered rule names, sorted; only the robust (or not) ones with ``robust``, only
    those that can (or cannot) run where the server sees just a sum with ``private``."""
    return tuple(name for name, r in RULES.items()
                 if (robust is None or r.robust == robust)
                 and (private is None or (not r.needs_individual_updates) == private))


# -- the rules ----------------------------------------------------------------------------------


def _fedavg(rule: Mapping[str, Any], results: Results) -> Weights:
    """Example-weighted mean (McMahan et al., 2017)."""
    return aggregators.fedavg(results)


for _name in ("fedavg", "fedprox", "fedbn"):  # one mean; they differ at the clients
    register_rule(_name, needs_individual_updates=False)(_fedavg)


@register_rule("scaffold", needs_individual_updates=True)  # its control variates are per client
def _scaffold(rule: Mapping[str, Any], results: Results) -> Weights:
    """The paper's unweighted mean of the sampled clients (Karimireddy et al., 2020)."""
    return aggregators.weighted_mean([w for w, _ in results], [1.0] * len(results))



@register_rule("median", needs_individual_updates=True, robust=True)
def _median(rule: Mapping[str, Any], results: Results) -> Weights:
    """Coordinate-wise median (Yin et al., 2018)."""
    return aggregators.median(results)



@register_rule("trimmed_mean", needs_individual_updates=True, robust=True)
def _trimmed_mean(rule: Mapping[str, Any], results: Results) -> Weights:
    """Coordinate-wise mean without the ``beta`` share at each end (Yin et al., 2018)."""
    return aggregators.trimmed_mean(results, float(rule["beta"]))



@register_rule("krum", needs_individual_updates=True, robust=True)
def _krum(rule: Mapping[str, Any], results: Results) -> Weights:
    """(Multi-)Krum (Blanchard et al., 2017): ``num_to_keep`` best-scored updates, averaged."""
    return aggregators.krum(results, int(rule["num_malicious"]),
                            int(rule.get("num_to_keep", 1)))

