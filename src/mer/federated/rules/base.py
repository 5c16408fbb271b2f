"""The rule base class, the name -> class table and what a rule is told about the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mer.federated import aggregators
from mer.federated.fidelity import FedFidelity
from mer.federated.state import ClientState, ClientUpdate, Weights
from mer.registry import Registry

Results = Sequence[tuple[Weights, int]]

RULES: Registry[type[Rule]] = Registry(
    "federated rule", hint="federated=<rule file> or federated.rule.name=<name>",
    error=ValueError)


def rule_names(robust: bool | None = None, private: bool | None = None) -> tuple[str, ...]:
    """Registered rule names, sorted; only the robust (or not) ones with ``robust``, only
    those that can (or cannot) run where the server sees just a sum with ``private``."""
    return tuple(name for name, r in RULES.items()
                 if (robust is None or r.robust == robust)
                 and (private is None or (not r.needs_individual_updates) == private))


@dataclass(frozen=True)
class Layout:
    """The model's state-dict entries: names in order, which are parameters (the rest are
    buffers), and which FedBN keeps local (:func:`mer.federated.aggregators.fedbn_mask`)."""

    entry_names: list[str]
    param_names: frozenset[str]
    bn_mask: list[bool]

    def param_mask(self) -> list[bool]:
        return [n in self.param_names for n in self.entry_names]


@dataclass
class ClientHooks:
    """What a rule installs on a client's module for one local training, and ``finish(update,
    start)``, run on the update before it is sent (e.g. SCAFFOLD's control variate)."""

    loss_terms: list[Callable] = field(default_factory=list)
    grad_hooks: list[Callable] = field(default_factory=list)
    finish: Callable[[ClientUpdate, Weights], None] | None = None


class Rule:
    """One federated strategy. The base is FedAvg: no client hook, the example-weighted mean,
    no server state. Subclasses override what differs.

    Args:
        fed: the ``federated`` config (``rule`` holds the rule's own keys).
        layout: the model's entries (:class:`Layout`).
        fidelity: mer's or the FED-PsyAU authors' choices (:mod:`mer.federated.fidelity`).
        client_opt: the clients' optimiser override (``{"name", "lr", "momentum"}``) or None.
        num_clients: clients in the federation.
    """

    name: ClassVar[str] = ""
    needs_individual_updates: ClassVar[bool] = False  # refused under secure sums / central DP
    robust: ClassVar[bool] = False                    # a Byzantine-robust rule
    proximal: ClassVar[bool] = False                  # takes federated.mu (FedProx)

    def __init__(self, fed: Mapping[str, Any], layout: Layout, fidelity: FedFidelity,
                 client_opt: dict | None = None, num_clients: int = 0) -> None:
        self.fed, self.cfg, self.layout = fed, fed["rule"], layout
        self.fidelity, self.client_opt, self.num_clients = fidelity, client_opt, num_clients
        if float(fed.get("mu") or 0.0) > 0 and not self.proximal:
            raise ValueError(f"federated.mu={fed['mu']} has no effect under "
                             f"federated.rule.name={self.name}: the proximal term is "
                             "FedProx's (federated=fedprox or pfedprox), or set mu to 0")

    # -- aggregation (pure, on (weights, num_examples) pairs) -----------------------------------

    @staticmethod
    def aggregate(rule: Mapping[str, Any], results: Results) -> Weights:
        """Example-weighted mean (McMahan et al., 2017)."""
        return aggregators.fedavg(results)

    def aggregate_updates(self, updates: list[ClientUpdate], current: Weights) -> Weights:
        """The round's aggregate of the kept updates (``current``: the round's global model);
        by default :meth:`aggregate` of ``(weights, num_examples)``."""
        return self.aggregate(self.cfg, [(u.weights, u.num_examples) for u in updates])

    # -- client side ----------------------------------------------------------------------------

    def start_weights(self, base: Weights, state: ClientState) -> Weights:
        """The model a client works with, from ``base`` (the global or its personalised one)."""
        return base

    def anchor_weights(self, global_weights: Weights, initial: Weights) -> Weights | None:
        """The model the clients' proximal term pulls towards (None: no such term)."""
        return None

    def client_hooks(self, state: ClientState, start: Weights, anchor: list | None,
                     databases: set[str]) -> ClientHooks:
        """The hooks of one client's local training (``anchor``: :meth:`anchor_weights` as the
        net's parameter tensors; ``databases``: those of its training clips)."""
        return ClientHooks()

    # -- server side ----------------------------------------------------------------------------

    def server_update(self, rnd: int, accepted: list[ClientUpdate],
                      states: dict[str, ClientState]) -> None:
        """After the server step: update the rule's state from the accepted updates."""

    def personalise(self, updates: list[ClientUpdate]) -> dict[str, Weights]:
        """``federated.personalise`` (P-FedProx): each accepted client's personalised model,
        ``own`` * its model + (1 - own) * the size-weighted mean of the others (batch-norm
        statistics mixed too unless ``fidelity.mix_buffers`` is false)."""
        personalise = self.fed.get("personalise")
        if not personalise or not updates:
            return {}
        mixed = aggregators.pfedprox_personalise(
            [u.weights for u in updates], [u.num_examples for u in updates],
            own=float(personalise["own"]),
            mix=None if self.fidelity.mix_buffers else self.layout.param_mask())
        return dict(zip([u.name for u in updates], mixed))

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The rule's server state (checkpointed, sent to worker processes)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def round_content(self) -> dict[str, Weights]:
        """Server state a client needs for its local training (sent with the global model)."""
        return {}


def zeros_like(weights: Weights) -> Weights:
    return [np.zeros_like(w, dtype=np.float32) for w in weights]
