"""FED-PsyAU's federated part as mer does it, or as its authors' code does (``fidelity``).

The top-level key ``fidelity`` (``mer`` | ``official``) picks, for the federated rule:

============== ======================================= ==========================================
setting        mer (default)                           official (``Fed_Framework/``)
============== ======================================= ==========================================
prox term      ``mu/2 sum_l ||w_l - a_l||^2``, one mu  ``mu/2 sum_l ||w_l - a_l||``, mu per
                                                       database (``federated.mu_per_database``)
prox anchor    the round's global model                the initial model (their server's
                                                       aggregation is commented out)
P-FedProx mix  every entry, BN statistics included     parameters only (BN buffers stay local)
AU model       trained                                 frozen (``model.kwargs.freeze_au``)
============== ======================================= ==========================================

``federated.prox_norm`` (squared | l2), ``federated.prox_anchor`` (global | initial) and
``federated.personalise.mix_buffers`` override one setting whatever the fidelity (null: the
fidelity's). The model's own differences (graph, priors, attention mask, levels, prior-ratio
schedule) follow ``model.kwargs.fidelity``, which the DPK-GAT configs take from ``fidelity``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mer.models.priors import FIDELITIES


def fidelity_of(cfg: Mapping) -> str:
    """``cfg.fidelity`` (``mer`` when absent); ValueError naming the key otherwise."""
    value = cfg.get("fidelity") or "mer"
    if value not in FIDELITIES:
        raise ValueError(f"fidelity={value}: must be one of {list(FIDELITIES)} (mer: mer's "
                         "choices; official: the FED-PsyAU authors' code); set fidelity=mer")
    return str(value)


@dataclass(frozen=True)
class FedFidelity:
    """The federated settings a fidelity implies (module table)."""

    fidelity: str = "mer"
    prox_norm: str = "squared"          # squared | l2
    prox_anchor: str = "global"         # global | initial
    mix_buffers: bool = True            # P-FedProx mixes BN statistics too
    mu: float = 0.0                     # federated.mu
    mu_per_database: dict[str, float] | None = None  # official: per database family
    families: dict[str, str] = field(default_factory=dict)  # SynME database -> family

    @property
    def any_mu(self) -> bool:
        """True when the rule has a proximal term (``federated.mu`` > 0)."""
        return self.mu > 0

    def mu_for(self, databases: Iterable[str]) -> float:
        """The proximal weight of a client holding ``databases``.

        mer: ``federated.mu``. official, when the rule has a proximal term (mu > 0):
        ``mu_per_database[family]`` for a client of one database family (SynME databases map
        to the family they imitate, ``data.families``), else ``mu_per_database["default"]``,
        else ``federated.mu``.
        """
        if self.mu_per_database is None or self.mu <= 0:
            return self.mu
        families = {self.families.get(str(db), str(db)) for db in databases}
        table = self.mu_per_database
        if len(families) == 1 and (family := next(iter(families))) in table:
            return float(table[family])
        return float(table.get("default", self.mu))


def from_config(cfg: Mapping) -> FedFidelity:
    """The :class:`FedFidelity` of a composed config (``fidelity``, ``federated.*``)."""
    fidelity = fidelity_of(cfg)
    fed = cfg.get("federated") or {}
    official = fidelity == "official"
    personalise = fed.get("personalise") or {}
    mix_buffers = personalise.get("mix_buffers") if hasattr(personalise, "get") else None
    table = fed.get("mu_per_database")
    families = dict((cfg.get("data") or {}).get("families") or {})
    return FedFidelity(
        fidelity=fidelity,
        prox_norm=str(fed.get("prox_norm") or ("l2" if official else "squared")),
        prox_anchor=str(fed.get("prox_anchor") or ("initial" if official else "global")),
        mix_buffers=(not official) if mix_buffers is None else bool(mix_buffers),
        mu=float(fed.get("mu") or 0.0),
        mu_per_database={str(k): float(v) for k, v in dict(table).items()}
        if official and table else None,
        families={str(k): str(v) for k, v in families.items()},
    )


def federated_model_cfg(model_cfg: dict, fidelity: str) -> dict:
    """The model config clients train: under ``official`` a network that can freeze its AU
    part (a ``freeze_au`` argument, e.g. DPK-GAT) gets ``freeze_au: true`` unless the config
    sets it (null counts as unset), as the authors' federated model freezes its AU model."""
    if fidelity != "official":
        return model_cfg
    from mer.models.registry import MODELS, list_models

    name = model_cfg.get("name")
    if name not in list_models():
        return model_cfg
    if "freeze_au" not in inspect.signature(MODELS[name]).parameters:
        return model_cfg
    kwargs = dict(model_cfg.get("kwargs") or {})
    if kwargs.get("freeze_au") is None:
        kwargs["freeze_au"] = True
    return {**model_cfg, "kwargs": kwargs}
