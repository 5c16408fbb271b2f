"""The networks, one file each; importing this package registers every one of them (timm's
pattern): each file decorates its class with ``@register_model("name")``
(:mod:`mer.models.registry`), and this file imports the files. A new network: one file, one
line here, one ``conf/model/<name>.yaml``."""

from mer.models import (  # noqa: F401 (imported for their @register_model)
    dense_attention,
    dpk_gat,
    frozen_head,
    htnet,
    mfdan,
    mpfnet,
    offapexnet,
    ststnet,
    timm_backbone,
)
from mer.models.registry import MODELS, create_model, list_models, register_model

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
