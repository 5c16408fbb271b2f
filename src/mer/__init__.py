"""mer: privacy-preserving micro-expression recognition."""

__version__ = "0.1.0"
