"""Federated rules by name (``federated.rule.name``): one class per strategy in :data:`RULES`.

A rule is a unit (:class:`~mer.federated.rules.base.Rule`): the hooks it installs on a
client's module (FedProx's proximal term, SCAFFOLD's gradient correction), the model a client
starts from (FedBN's own batch-norm entries), what the client sends, the server's aggregation
(through the pure functions of :mod:`mer.federated.aggregators`), the server update (SCAFFOLD's
control variates), the personalisation and the state it keeps.
``needs_individual_updates`` (a rule that must see each client's update cannot run under
secure aggregation or central DP) makes privacy compatibility an attribute check.

A new rule: one file here with a :class:`Rule` subclass registered with
``@RULES.register("<name>")`` (imported below), and one ``conf/federated/<name>.yaml``.
"""

from mer.federated.rules import fedavg, fedbn, fednova, fedprox, robust, scaffold  # noqa: F401
from mer.federated.rules.base import (  # noqa: F401
    RULES,
    ClientHooks,
    Layout,
    Rule,
    rule_names,
)
