"""edge-prune: fit visual-token pruning recipes for LLaVA-style models and run them on devices."""

__version__ = "0.1.0"
