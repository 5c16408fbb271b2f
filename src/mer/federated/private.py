"""The run's privacy layer: DP-SGD at the clients, central DP, secure aggregation.

:class:`PrivacySide` is a part of :class:`mer.federated.loop.FederatedRun`: it sets up
``privacy`` (``none | ckks | secagg | dp | central_dp``), refuses a rule that needs individual
updates where the server sees only a sum (``Rule.needs_individual_updates``), and holds the
secure-aggregation steps of a round and of the data prior's AU counts.
"""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from mer.engine.module import MERModule
from mer.federated.partition import ClientData
from mer.federated.state import ClientUpdate, Weights
from mer.privacy import from_config as privacy_from_config
from mer.privacy.base import (
    SecureAggregation,
    TooFewContributors,
    mean_from_sum,
    personalise_from_sum,
    require_contributors,
)

log = logging.getLogger(__name__)


class PrivacySide:
    """Privacy set-up and protected sums of a federated run (a part of ``FederatedRun``)."""

    def _setup_privacy(self, privacy_cfg: DictConfig | None) -> None:
        """``privacy``: none | ckks | secagg (secure aggregation), dp (DP-SGD at each client,
        one accountant per client) or central_dp (clip + noise at the server)."""
        from mer.privacy.dp import (
            CentralDP,
            CentralDPConfig,
            ClientPrivacy,
            DPConfig,
            noise_for_budget,
            sample_rate_for,
        )

        self.privacy_name = privacy_cfg.name if privacy_cfg else "none"
        self.dp_model: dict | None = None  # what DP changed in the model (_fixed)
        layer = privacy_from_config(privacy_cfg) if privacy_cfg else None
        self.secure = layer if isinstance(layer, SecureAggregation) else None
        self.dp = layer if isinstance(layer, DPConfig) else None
        self.central_dp = CentralDP(layer, len(self.clients), self.seed) \
            if isinstance(layer, CentralDPConfig) else None
        # protected aggregates (secure sums, central DP's clipped mean) of fewer contributors
        # than privacy.min_clients are never released: the round is skipped
        self.min_clients = self.secure.min_clients if self.secure else \
            int(layer.min_clients) if self.central_dp else 0
        if (self.secure or self.central_dp) and self.strategy.needs_individual_updates:
            from mer.federated.rules import rule_names

            raise ValueError(
                f"federated.rule.name={self.rule} cannot run under privacy={self.privacy_name}: "
                "the server never sees individual updates there (robust rules, SCAFFOLD and "
                f"FedNova need them). Use one of {list(rule_names(private=True))} (P-FedProx "
                "is fedprox).")
        if self.dp and self.rule == "scaffold":
            raise ValueError("federated.rule.name=scaffold cannot run under privacy=dp: its "
                             "gradient correction would bypass DP-SGD's clipping and noise")
        self.client_privacy = {}
        if self.dp:
            batch = int(self.cfg.data.batch_size)
            for c in self.clients:
                q = sample_rate_for(self.dp, len(c.train_idx), batch)
                steps = int(self.fed.rounds) * int(self.fed.local_epochs) * round(1 / q)
                self.client_privacy[c.name] = ClientPrivacy(c.name, self.dp,
                                                            noise_for_budget(self.dp, q, steps))

    def _fixed(self, module: MERModule) -> MERModule:
        """Under DP every copy of the model has batch norm replaced by group norm (Opacus'
        fix): DP-SGD needs per-sample gradients, and central DP's noise on running
        variances could make them negative. The first copy (the server's template) records
        and logs what changed and, under DP-SGD, how per-sample gradients are computed."""
        if self.dp or self.central_dp:
            from mer.privacy.dp import fix_module, model_changes, resolve_grad_sample

            if self.dp_model is None:
                changes = model_changes(module.net)
                fix_module(module)
                self.dp_model = {"changes": changes}
                if self.dp:  # a grad_sample mode the network cannot take fails here, at once
                    self.dp_model["grad_sample"] = resolve_grad_sample(module.net,
                                                                       self.dp.grad_sample)
                log.info("privacy=%s: %s changed for Opacus: %s%s", self.privacy_name,
                         type(module.net).__name__, changes or "nothing",
                         f"; per-sample gradients by {self.dp_model['grad_sample']}"
                         if self.dp else "")
            else:
                fix_module(module)
        return module

    def epsilons(self) -> dict:
        """Privacy spent so far: per client (DP-SGD) or for every client (central DP), and
        ``model``: what DP changed in the network (``changes``, counted by kind) and how
        DP-SGD computes per-sample gradients (``grad_sample``: hooks | functorch)."""
        model = {"model": self.dp_model} if self.dp_model else {}
        if self.dp:
            return {"delta": self.dp.delta,
                    "clients": {n: p.epsilon() for n, p in self.client_privacy.items()},
                    **model}
        if self.central_dp:
            return {"delta": self.central_dp.cfg.delta, "central": self.central_dp.epsilon(),
                    **model}
        return {}

    def au_counts(self) -> np.ndarray | None:
        """The clients' AU co-occurrence counts summed (DPK-GAT's data prior); None: count
        them from ``samples`` (in-process, where the server's process holds them). Under
        secure aggregation each lab protects its own counts and only the sum is opened, as
        over Flower (``query.secure_counts``)."""
        if self.secure is None:
            return None
        try:
            total, _ = self.secure.sum_vectors(0, {c.name: self.client_au_counts(c)
                                                   for c in self.clients})
        except TooFewContributors as e:
            log.warning("AU co-occurrence counts not released (%s): the data prior is empty", e)
            return np.zeros((12, 12))
        return np.rint(total).reshape(12, 12)

    def client_au_counts(self, client: ClientData) -> np.ndarray:
        """A lab's side: the (144,) AU co-occurrence counts of its training split."""
        from mer.models.priors import cooccurrence_counts

        au, mask = self.samples.au_targets()
        return np.asarray(cooccurrence_counts(au[client.train_idx], mask[client.train_idx]),
                          np.float64).ravel()

    def _secure_aggregate(self, rnd: int, updates: list[ClientUpdate]) -> tuple[Weights, dict]:
        """FedAvg under secure aggregation: clients protect ``[n_k w_k, n_k]``, the server
        only adds payloads (:meth:`server_sum`), the sum is opened (key holders decrypt, or
        the survivors' shares unmask it) only for ``privacy.min_clients`` contributors or
        more (else :class:`TooFewContributors`: the round is skipped); under P-FedProx each
        client computes its own personalised model from the decoded sum. (Each client
        checked its own update for NaN/inf before sending: ``check_updates``.)"""
        ids = [u.name for u in updates]
        require_contributors(len(ids), self.secure.min_clients, f"round {rnd}")
        self.secure.begin_round(rnd, ids, self.global_weights)
        payloads = {u.name: self.secure.client_payload(u.name, u.weights, u.num_examples)
                    for u in updates}  # client side
        total = self.server_sum(payloads)
        flat_sum, count = self.secure.decode_sum(total, ids)
        mean = mean_from_sum(flat_sum, count, self.secure.layout, f"round {rnd}: {ids}")
        personal = {}
        personalise = self.fed.get("personalise")
        if personalise:
            personal = {u.name: personalise_from_sum(u.weights, u.num_examples, flat_sum, count,
                                                     self.secure.layout,
                                                     own=float(personalise.own))
                        for u in updates}
        return mean, personal

    def server_sum(self, payloads: dict[str, bytes]) -> bytes:
        """The server's whole part under secure aggregation: add the protected payloads."""
        return self.secure.server_sum(payloads)
