"""On-disk names shared by the GGUF converter and the llama.cpp runtime, defined once.

The converter (workstation side) and the runtime (device side) both import this module, so it
must stay free of torch, transformers, gguf and llama_cpp imports.
"""

from __future__ import annotations

BACKEND = "llamacpp"

# Files in a llama.cpp artifact directory.
LM_FILE = "model.gguf"  # language model + tokenizer + edge_prune.* policy keys
MMPROJ_FILE = "mmproj.gguf"  # CLIP tower + LLaVA MLP projector, llama.cpp's multimodal format
RECIPE_FILE = "recipe.json"  # the same recipe as in KEY_RECIPE, readable without a GGUF reader

# --quant choices. The mmproj is always f16 (see converters/gguf.py).
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")

# edge_prune.* metadata keys in the language-model GGUF (stock llama.cpp ignores unknown keys).
KEY_VERSION = "edge_prune.version"  # int: version of this key layout
KEY_RECIPE = "edge_prune.recipe"  # str: the recipe JSON (edge-prune-recipe v1), verbatim
KEY_PAIR_ID = "edge_prune.pair_id"  # str: also written into the mmproj; both files of one convert share it
KEY_IMAGE_TOKEN_ID = "edge_prune.image_token_id"  # u32: the <image> placeholder token
KEY_NUM_VISUAL_TOKENS = "edge_prune.num_visual_tokens"  # u32: visual tokens per image (unpruned)
KEY_SOURCE_ARCHITECTURE = "edge_prune.source_architecture"  # str: e.g. LlavaForConditionalGeneration
# The checkpoint's image processor (CLIP: resize the shortest edge, centre-crop), so the runtime can
# give llama.cpp's encoder exactly the pixels transformers would (llama.cpp pads non-square images instead).
KEY_RESIZE_SHORTEST_EDGE = "edge_prune.vision.resize_shortest_edge"  # u32, 0 = no resize
KEY_CROP_SIZE = "edge_prune.vision.crop_size"  # u32, 0 = no centre crop
KEYS_VERSION = 1

# Written into the mmproj too (clip.cpp ignores keys it does not know).
KEY_MMPROJ_PAIR_ID = KEY_PAIR_ID
KEY_MMPROJ_CLASS_TOKEN = "edge_prune.vision.class_token"  # bool: whether v.class_embd was written

# Learned recipe modules (guides, exit routers) as extra mmproj tensors: name = prefix + safetensors key.
TENSOR_PREFIX = {"guide": "edge_prune.guide.", "router": "edge_prune.router."}
GGUF_MAX_TENSOR_NAME = 64  # GGML_MAX_NAME, terminating NUL included

# llama.cpp's own clip key that gguf-py's writer has no helper for (tools/mtmd/clip-impl.h).
KEY_CLIP_FEATURE_LAYER = "clip.vision.feature_layer"
