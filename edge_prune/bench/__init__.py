"""The synthetic VQA benchmark: scene/question generator, its tokenizer, and the model trainer."""

from edge_prune.bench.generator import FAMILIES, SPLITS, VQAItem, iter_items, make_item, make_scene

__all__ = ["FAMILIES", "SPLITS", "VQAItem", "iter_items", "make_item", "make_scene"]
