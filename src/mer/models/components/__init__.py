"""Building blocks shared by networks (graph layers, ...)."""

from mer.models.components.dual_prior_gat import DualPriorGATConv

__all__ = ["DualPriorGATConv"]
