"""bico: Bidirectional Causal language model Optimization (arXiv 2311.07468)."""

__version__ = "0.1.0"
