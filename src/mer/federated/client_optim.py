"""The optimiser a federated client trains with (``federated.client_optimizer``).

null: the model's own (``model.optimizer``, ``model.lr``), except under SCAFFOLD. SCAFFOLD's
option-II control update ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (Karimireddy et al. 2020,
Alg. 1) reads the distance walked in K local steps as K plain SGD steps of size lr, so that
``c_i+`` is the mean gradient the client saw. Momentum or Adam walk another distance (momentum
0.9 makes it ~10x longer; Adam's steps do not scale with the gradient at all), and the control
variates come out wrong. ``federated=scaffold`` therefore trains its clients with plain SGD
(``conf/federated/scaffold.yaml`` sets ``client_optimizer: {name: sgd, momentum: 0.0}``; with
the key null it is used too), and refuses any other optimiser.
"""

from __future__ import annotations

from collections.abc import Mapping

from mer.config_rules import ConfigError

PLAIN_SGD = {"name": "sgd", "momentum": 0.0, "lr": None}


def scaffold_problem(fed: Mapping) -> str | None:
    """Why ``federated`` cannot run SCAFFOLD with its client optimiser (None: it can)."""
    rule = (fed.get("rule") or {}).get("name")
    spec = fed.get("client_optimizer")
    if rule != "scaffold" or spec is None:
        return None
    name, momentum = spec.get("name", "sgd"), spec.get("momentum", 0.0)
    if name == "sgd" and momentum == 0:
        return None
    return (f"federated.rule.name=scaffold needs plain SGD at the clients, but "
            f"federated.client_optimizer.name={name}"
            + (f" with federated.client_optimizer.momentum={momentum}" if name == "sgd" else "")
            + ": SCAFFOLD's control variates c_i+ = c_i - c + (x - y_i)/(K lr) assume K plain "
            "SGD steps (momentum or Adam make them wrong); set "
            "federated.client_optimizer={name: sgd, momentum: 0.0} (conf/federated/"
            "scaffold.yaml does), or use another rule")


def client_optimizer(fed: Mapping, model_cfg: Mapping) -> dict | None:
    """``{"name", "lr", "momentum"}`` the clients' local training uses, or None for the
    model's own optimiser. ConfigError (naming the keys) for SCAFFOLD with anything but plain
    SGD."""
    problem = scaffold_problem(fed)
    if problem:
        raise ConfigError([problem])
    spec = fed.get("client_optimizer")
    rule = (fed.get("rule") or {}).get("name")
    if spec is None and rule != "scaffold":
        return None
    spec = {**PLAIN_SGD, **dict(spec or {})}
    lr = spec.get("lr")
    momentum = spec.get("momentum")
    return {"name": str(spec["name"]), "lr": float(model_cfg["lr"] if lr is None else lr),
            "momentum": None if momentum is None else float(momentum)}
