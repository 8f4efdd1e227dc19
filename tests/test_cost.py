"""Cost model and config-only shape reader: hand-computed figures for LLaVA-1.5-7B, invariants, errors.

Fixtures: llava-1.5-7b and llava-v1.6-mistral-7b hold the public llava-hf configs' values;
llava-qwen2-1.5b-gqa is hand-made (Qwen2-1.5B decoder dims, CLIP-L/336 tower, two feature layers,
"full" strategy) to exercise GQA with 2 KV heads, qkv biases, tied embeddings and concatenated features.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_prune.cost import (
    ACCOUNTINGS,
    PARTS,
    decode_flops,
    estimate,
    format_report,
    kv_cache_bytes,
    parameter_count,
    prefill_breakdown,
    prefill_flops,
    token_schedule,
    weight_bytes,
)
from edge_prune.errors import ModelError, RecipeError
from edge_prune.models.shapes import (
    ModelShape,
    llava_next_num_crops,
    llava_next_visual_tokens,
    load_shape,
    shape_from_dict,
)
from edge_prune.recipe import ModelSignature, PruneSpec, Recipe

FIXTURES = Path(__file__).parent / "fixtures"
LLAVA_7B = FIXTURES / "llava-1.5-7b"
NEXT_7B = FIXTURES / "llava-v1.6-mistral-7b"
QWEN2_GQA = FIXTURES / "llava-qwen2-1.5b-gqa"

# LLaVA-1.5-7B facts used by the hand computations below.
D, M, V = 4096, 11008, 32064  # text hidden, SwiGLU intermediate, vocab
VD, VI, VT = 1024, 4096, 577  # CLIP hidden, intermediate, tokens per layer (576 patches + CLS)
TEXT, VIS = 64, 576
N = TEXT + VIS  # 640 tokens enter the decoder
ATTN_PROJ_MACS = D * (2 * 4096 + 2 * 4096)  # per token: q (4096) + k, v (32 kv heads x 128) + o (4096)
VISION_MACS = 576 * (3 * 14 * 14) * VD + 23 * (4 * VT * VD * VD + 2 * VT * VT * VD + 2 * VT * VD * VI)
PROJECTOR_MACS = 576 * (VD * D + D * D)
LM_HEAD_MACS = D * V


@pytest.fixture(scope="module")
def llava() -> ModelShape:
    return load_shape(LLAVA_7B)


@pytest.fixture(scope="module")
def mistral() -> ModelShape:
    return load_shape(NEXT_7B / "config.json")


@pytest.fixture(scope="module")
def qwen2() -> ModelShape:
    return load_shape(QWEN2_GQA)


def recipe_for(shape: ModelShape, keep_after: list[float], skip: list[int] | None = None,
               scorer: str = "fitprune", keep_input: float = 1.0) -> Recipe:
    return Recipe(model=shape.signature(), skip_attention=skip or [],
                  prune=PruneSpec(scorer=scorer, keep_after=keep_after, keep_input=keep_input))


@pytest.fixture(scope="module")
def staged(llava: ModelShape) -> Recipe:
    """Keep all for layers 0-1, half after layer 2's attention, a quarter after layer 10's."""
    return recipe_for(llava, [1.0, 1.0] + [0.5] * 8 + [0.25] * 22)


# Under `staged`, with 64 text tokens (attention sees what entered the layer, MLP what was kept):
#   attention in: layers 0-2 -> 640, layers 3-10 -> 64+288 = 352, layers 11-31 -> 64+144 = 208
#   MLP:          layers 0-1 -> 640, layers 2-9  -> 352,           layers 10-31 -> 208
ATTN_IN = [(3, 640), (8, 352), (21, 208)]
MLP_N = [(2, 640), (8, 352), (22, 208)]


# ---- shapes -------------------------------------------------------------------------------------
def test_llava_7b_shape(llava: ModelShape) -> None:
    assert (llava.num_layers, llava.hidden_size, llava.intermediate_size) == (32, 4096, 11008)
    assert (llava.num_attention_heads, llava.num_key_value_heads, llava.head_dim) == (32, 32, 128)
    assert llava.vocab_size == 32064 and llava.text_model_type == "llama"
    v = llava.vision
    assert (v.num_layers, v.layers_run, v.hidden_size, v.intermediate_size) == (24, 23, 1024, 4096)
    assert (v.num_patches, v.num_positions) == (576, 577)
    assert (llava.projector_in_features, llava.projector_hidden_features) == (1024, 4096)
    assert llava.num_visual_tokens == 576
    assert llava.signature() == ModelSignature("LlavaForConditionalGeneration", 32, 4096, 11008, 32, 32, 576)


def test_gqa_and_feature_layer_list(mistral: ModelShape, qwen2: ModelShape) -> None:
    assert mistral.architecture == "LlavaNextForConditionalGeneration"
    assert (mistral.num_key_value_heads, mistral.kv_dim, mistral.intermediate_size) == (8, 1024, 14336)
    assert (qwen2.num_key_value_heads, qwen2.head_dim, qwen2.kv_dim) == (2, 128, 256)
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    # [-2, -5] concatenates two 1024-wide feature maps; the deepest needs 23 layers; "full" keeps CLS.
    assert (qwen2.projector_in_features, qwen2.vision.layers_run, qwen2.num_visual_tokens) == (2048, 23, 577)


def test_llava_next_visual_tokens_match_hand_count(mistral: ModelShape) -> None:
    # 336x336 -> best pinpoint 336x672 (3 crops), grid 24x48 rows x cols, unpadded to 24x24:
    # 576 base + 576 + 24 newline tokens.
    assert (llava_next_num_crops(mistral, 336, 336), llava_next_visual_tokens(mistral, 336, 336)) == (3, 1176)
    # 672x672 -> 2x2 crops + base, 48x48 grid, no padding: 576 + 2304 + 48.
    assert (llava_next_num_crops(mistral, 672, 672), llava_next_visual_tokens(mistral, 672, 672)) == (5, 2928)
    # 500 high x 800 wide -> 672x672, unpad rows to round(500 * 48/800) = 30: 576 + 30*48 + 30.
    assert llava_next_visual_tokens(mistral, 500, 800) == 2046


def test_llava_next_helpers_refuse_fixed_grid_model(llava: ModelShape) -> None:
    with pytest.raises(ModelError, match="LlavaNextForConditionalGeneration only"):
        llava_next_visual_tokens(llava, 336, 336)


def test_parameter_counts_match_transformers_model() -> None:
    """The weight inventory equals the parameters transformers builds (meta device: no memory)."""
    import torch
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    for path, config_cls, model_cls in ((LLAVA_7B, LlavaConfig, LlavaForConditionalGeneration),
                                        (NEXT_7B, LlavaNextConfig, LlavaNextForConditionalGeneration),
                                        (QWEN2_GQA, LlavaConfig, LlavaForConditionalGeneration)):
        config = config_cls.from_dict(json.loads((path / "config.json").read_text()))
        with torch.device("meta"):
            model = model_cls(config)
        names = dict(model.named_parameters())
        lm = sum(p.numel() for n, p in names.items() if "language_model" in n or n.startswith("lm_head"))
        shape = load_shape(path)
        assert parameter_count(shape) == sum(p.numel() for p in names.values()), path.name
        assert parameter_count(shape, "language_model") == lm, path.name


# ---- prefill: hand computations -------------------------------------------------------------------
def test_exact_baseline_7b(llava: ModelShape) -> None:
    macs = (VISION_MACS + PROJECTOR_MACS + 32 * N * ATTN_PROJ_MACS + 32 * 4096 * N * (N + 1)
            + 32 * 3 * N * D * M + LM_HEAD_MACS)
    assert prefill_flops(llava, None, TEXT) == 2 * macs == 8_787_284_553_728


def test_exact_pruned_7b(llava: ModelShape, staged: Recipe) -> None:
    attn = sum(k * (n * ATTN_PROJ_MACS + 4096 * n * (n + 1)) for k, n in ATTN_IN)
    mlp = sum(k * 3 * n * D * M for k, n in MLP_N)
    macs = VISION_MACS + PROJECTOR_MACS + attn + mlp + LM_HEAD_MACS
    assert prefill_flops(llava, staged, TEXT) == 2 * macs == 3_984_136_564_736
    parts = prefill_breakdown(llava, staged, TEXT)
    assert parts["vision_tower"] == 2 * VISION_MACS and parts["lm_head"] == 2 * LM_HEAD_MACS


def test_merging_is_counted_at_each_dropping_layer(llava: ModelShape, staged: Recipe) -> None:
    """`staged` drops 288 of 576 after layer 2 and 144 of 288 after layer 10: a dropped x kept similarity
    and a weighted sum per dropped token, exact accounting only."""
    merged = replace(staged, prune=replace(staged.prune, merge=True))
    macs = 288 * 288 * D + 288 * D + 144 * 144 * D + 144 * D
    assert prefill_breakdown(llava, merged, TEXT)["merge"] == 2 * macs
    assert prefill_flops(llava, merged, TEXT) == prefill_flops(llava, staged, TEXT) + 2 * macs
    assert prefill_breakdown(llava, staged, TEXT)["merge"] == 0
    assert prefill_breakdown(llava, merged, TEXT, accounting="fitprune") == prefill_breakdown(
        llava, staged, TEXT, accounting="fitprune")


def test_fastv_accounting_7b(llava: ModelShape, staged: Recipe) -> None:
    # 4nd^2 + 2n^2 d + 2ndm per layer over all tokens, attention part with n_in, MLP with n_out.
    assert prefill_flops(llava, None, TEXT, "fastv") == 32 * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M)
    assert prefill_flops(llava, None, TEXT, "fastv") == 3_328_599_654_400
    pruned = sum(k * (4 * n * D * D + 2 * n * n * D) for k, n in ATTN_IN) + sum(
        k * 2 * n * D * M for k, n in MLP_N)
    assert prefill_flops(llava, staged, TEXT, "fastv") == pruned


def test_fitprune_accounting_7b(llava: ModelShape, staged: Recipe) -> None:
    # 4nd^2 + 2n^2 d + 3ndm per layer over visual tokens only.
    assert prefill_flops(llava, None, TEXT, "fitprune") == 32 * (
        4 * VIS * D * D + 2 * VIS * VIS * D + 3 * VIS * D * M) == 3_817_152_184_320
    pruned = sum(k * (4 * v * D * D + 2 * v * v * D) for k, v in [(3, 576), (8, 288), (21, 144)]) + sum(
        k * 3 * v * D * M for k, v in [(2, 576), (8, 288), (22, 144)])
    assert prefill_flops(llava, staged, TEXT, "fitprune") == pruned
    # text tokens do not enter FitPrune's count
    assert prefill_flops(llava, staged, 500, "fitprune") == pruned


def test_exact_matches_torch_flop_counter() -> None:
    """Run tiny LLaVA / LLaVA-NeXT models under torch's FlopCounterMode and compare.

    transformers' eager forward differs from the exact accounting in two documented ways, added
    back here: it runs the vision layers after the feature layer, and it computes the full n x n
    attention square (the accounting counts the causal half).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    from edge_prune.cost import image_plan

    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    cases = (("llava", LlavaConfig, LlavaForConditionalGeneration),
             ("llava_next", LlavaNextConfig, LlavaNextForConditionalGeneration))
    for model_type, config_cls, model_cls in cases:
        data = {"model_type": model_type, "text_config": text, "vision_config": vision,
                "image_token_index": 127, "vision_feature_layer": -2,
                "image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]]}
        if model_type == "llava":
            del data["image_grid_pinpoints"]
        shape = shape_from_dict(data)
        config = config_cls.from_dict(data)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = model_cls(config).eval()
        image_hw = (30, 50)
        crops, n_visual = image_plan(shape, image_hw)
        ids = torch.tensor([[1, 2, 3] + [127] * n_visual + [4, 5, 6]])
        if model_type == "llava":
            inputs = {"pixel_values": torch.randn(1, 3, 28, 28)}
        else:
            inputs = {"pixel_values": torch.randn(1, crops, 3, 28, 28),
                      "image_sizes": torch.tensor([image_hw])}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=ids, logits_to_keep=1, **inputs)
        n, t = 6 + n_visual, shape.vision.num_positions
        unused_vision_layer = 4 * t * 32 * 32 + 2 * t * t * 32 + 2 * t * 32 * 48
        square_minus_causal = shape.num_layers * shape.q_dim * n * (n - 1)
        expected = prefill_flops(shape, None, 6, image_hw=image_hw) + 2 * (
            crops * unused_vision_layer + square_minus_causal)
        assert counter.get_total_flops() == expected, model_type
    assert (crops, n_visual) == (5, 14)  # the NeXT case really ran several crops


# ---- invariants ---------------------------------------------------------------------------------
def test_identity_recipe_reduces_nothing(llava: ModelShape) -> None:
    identity = Recipe.identity(llava.signature())
    for accounting in ACCOUNTINGS:
        report = estimate(llava, identity, accounting=accounting)
        assert report.flops_reduction == 0.0 and report.pruned_flops == report.baseline_flops
        assert report.kv_bytes_pruned == report.kv_bytes_baseline
        assert report.decode_flops_pruned == report.decode_flops_baseline


def test_more_pruning_costs_less(llava: ModelShape) -> None:
    keeps = [1.0, 0.75, 0.5, 0.25, 0.0]
    recipes = [recipe_for(llava, [1.0, 1.0] + [k] * 30) for k in keeps]
    for accounting in ACCOUNTINGS:
        reports = [estimate(llava, r, accounting=accounting) for r in recipes]
        flops = [r.pruned_flops for r in reports]
        assert all(a > b for a, b in zip(flops, flops[1:])), (accounting, flops)
        kv = [r.kv_bytes_pruned for r in reports]
        assert all(a > b for a, b in zip(kv, kv[1:])), kv
        reductions = [r.flops_reduction for r in reports]
        assert reductions[0] == 0.0 and all(0 < x < 1 for x in reductions[1:])


def test_keep_counts_equal_recipe(llava: ModelShape, staged: Recipe) -> None:
    counts = staged.keep_counts(VIS)
    for accounting in ACCOUNTINGS:
        expected = prefill_flops(llava, staged, TEXT, accounting)
        assert prefill_flops(llava, counts, TEXT, accounting) == expected


def test_input_pooling_counts_in_layer_zero(llava: ModelShape) -> None:
    pooled = recipe_for(llava, [0.25] * 32, scorer="pool", keep_input=0.25)
    parts = prefill_breakdown(llava, pooled, TEXT)
    assert parts["attention_projections"] == 2 * 32 * 208 * ATTN_PROJ_MACS
    assert parts["projector"] == 2 * PROJECTOR_MACS  # the projector still maps all 576 tokens


def test_kv_bytes_and_gqa(llava: ModelShape, mistral: ModelShape, staged: Recipe) -> None:
    base = estimate(llava, staged)
    assert base.kv_bytes_baseline == 32 * 2 * (32 * 128) * N * 2 == 320 * 2**20
    assert base.kv_bytes_pruned == 2 * 4096 * 2 * sum(k * n for k, n in ATTN_IN)
    lengths = [N] * 32
    gqa = kv_cache_bytes(mistral, lengths)
    mha = kv_cache_bytes(replace(mistral, num_key_value_heads=32), lengths)
    assert gqa * 4 == mha  # 8 KV heads instead of 32
    assert kv_cache_bytes(llava, lengths, "q8_0") * 32 == kv_cache_bytes(llava, lengths, "fp16") * 17
    # GQA also narrows k_proj and v_proj (4096 -> 1024 outputs); attention scores still use 32 q heads.
    gqa_parts = prefill_breakdown(mistral, None, TEXT)
    mha_parts = prefill_breakdown(replace(mistral, num_key_value_heads=32), None, TEXT)
    n = TEXT + 1176  # LLaVA-NeXT's default image: 336x336 -> 1176 visual tokens
    assert mha_parts["attention_projections"] - gqa_parts["attention_projections"] == (
        2 * 32 * n * D * 2 * (4096 - 1024))
    assert mha_parts["attention_scores"] == gqa_parts["attention_scores"]


def test_skip_attention_removes_attention_work(llava: ModelShape) -> None:
    skipping = recipe_for(llava, [1.0] * 32, skip=[5, 6], scorer="none")
    report = estimate(llava, skipping)
    attention_layer = N * ATTN_PROJ_MACS + 4096 * N * (N + 1)
    assert report.baseline_flops - report.pruned_flops == 2 * 2 * attention_layer
    assert report.kv_bytes_pruned * 32 == report.kv_bytes_baseline * 30
    decode_attention = ATTN_PROJ_MACS + 2 * 4096 * (N + 1)
    assert report.decode_flops_baseline - report.decode_flops_pruned == 2 * 2 * decode_attention
    fastv = estimate(llava, skipping, accounting="fastv")
    assert fastv.baseline_flops - fastv.pruned_flops == 2 * (4 * N * D * D + 2 * N * N * D)
    assert [row["kv_cache"] for row in report.tokens_per_layer][4:8] == [N, 0, 0, N]


def test_decode_flops_hand_count(llava: ModelShape, staged: Recipe) -> None:
    per_layer = ATTN_PROJ_MACS + 3 * D * M
    assert decode_flops(llava, [N] * 32) == 2 * (32 * per_layer + 2 * 4096 * 32 * (N + 1) + LM_HEAD_MACS)
    assert decode_flops(llava, [N] * 32) == 13_550_747_648
    report = estimate(llava, staged)
    cached = sum(k * (n + 1) for k, n in ATTN_IN)
    assert report.decode_flops_pruned == 2 * (32 * per_layer + 2 * 4096 * cached + LM_HEAD_MACS)


def test_paper_accountings_exclude_vision(llava: ModelShape, staged: Recipe) -> None:
    bigger_tower = replace(llava, vision=replace(llava.vision, layers_run=24))
    for accounting in ("fastv", "fitprune"):
        parts = prefill_breakdown(llava, staged, TEXT, accounting)
        assert parts["vision_tower"] == parts["projector"] == parts["lm_head"] == 0
        expected = prefill_flops(llava, staged, TEXT, accounting)
        assert prefill_flops(bigger_tower, staged, TEXT, accounting) == expected
    assert prefill_flops(bigger_tower, staged, TEXT) > prefill_flops(llava, staged, TEXT)


def test_mismatched_recipe_raises(llava: ModelShape, mistral: ModelShape, staged: Recipe) -> None:
    with pytest.raises(RecipeError, match="fitted for another model.*intermediate_size"):
        estimate(mistral, staged)
    with pytest.raises(RecipeError, match="num_visual_tokens"):
        prefill_flops(replace(llava, num_visual_tokens=577), staged)


# ---- weights ------------------------------------------------------------------------------------
def test_weight_bytes_7b(llava: ModelShape) -> None:
    assert parameter_count(llava) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's published size
    lm = parameter_count(llava, "language_model")
    assert lm == 6_738_939_904
    fp16 = weight_bytes(llava, "fp16")
    assert fp16.total == 2 * 7_063_427_072 and weight_bytes(llava, "fp32").total == 4 * 7_063_427_072
    vectors = (2 * 32 + 1) * D  # RMSNorm weights stay f32 in GGUF
    assert weight_bytes(llava, "q4_0").language_model == (lm - vectors) * 9 // 16 + vectors * 4
    # 8da4w: linears at 4 bits + one fp32 scale per 128 inputs; embeddings and norms fp16
    linear = (4 * D * D + 3 * D * M) * 32 + V * D
    scales = 32 * (4 * D * (D // 128) + 2 * M * (D // 128) + D * (M // 128)) + V * (D // 128)
    assert weight_bytes(llava, "8da4w").language_model == linear // 2 + 4 * scales + 2 * (V * D + vectors)
    order = [weight_bytes(llava, f).language_model for f in ("fp16", "q8_0", "q4_k_m", "q4_0")]
    assert order == sorted(order, reverse=True)
    # vision tower + projector are never quantized
    assert weight_bytes(llava, "int8").vision_projector == fp16.vision_projector


# ---- report, speed, errors ----------------------------------------------------------------------
def test_report_dict_and_text(llava: ModelShape, staged: Recipe) -> None:
    report = estimate(llava, staged)
    data = json.loads(json.dumps(report.to_dict()))
    for key in ("baseline_flops", "pruned_flops", "flops_reduction", "kv_bytes_baseline", "kv_bytes_pruned",
                "decode_flops_baseline", "decode_flops_pruned", "accounting", "text_tokens", "visual_tokens",
                "tokens_per_layer", "weight_bytes"):
        assert key in data
    assert set(data["baseline_breakdown"]) == set(PARTS)
    assert data["tokens_per_layer"][2] == {"layer": 2, "attention_in": 640, "mlp": 352, "kv_cache": 640,
                                           "skip_attention": False}
    assert data["weight_bytes"]["fp16"]["total"] == 2 * 7_063_427_072
    assert data["flops_reduction"] == pytest.approx(1 - 3_984_136_564_736 / 8_787_284_553_728)
    text = format_report(report)
    assert "-54.7%" in text and "layers 11-31" in text and "q4_k_m" in text


def test_estimate_is_fast(llava: ModelShape, staged: Recipe) -> None:
    start = time.perf_counter()
    for accounting in ACCOUNTINGS:
        estimate(llava, staged, accounting=accounting)
    assert time.perf_counter() - start < 0.5


def test_token_schedule_rejects_bad_counts(llava: ModelShape) -> None:
    with pytest.raises(ValueError, match="one per decoder layer"):
        token_schedule(llava, [576] * 31)
    with pytest.raises(ValueError, match="must not increase"):
        token_schedule(llava, [100] + [200] * 31)
    with pytest.raises(ValueError, match="accounting 'flops'"):
        prefill_flops(llava, None, accounting="flops")


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def test_bad_paths_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_shape(tmp_path / "missing")
    with pytest.raises(ModelError, match="has no config.json"):
        load_shape(tmp_path)
    with pytest.raises(ModelError, match=r"not valid JSON \(line 3, column 1"):
        load_shape(_write(tmp_path, '{\n  "model_type": "llava",\n'))


def test_unsupported_architecture_and_decoder(tmp_path: Path) -> None:
    _write(tmp_path, json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"],
                                 "model_type": "qwen2_vl"}))
    with pytest.raises(ModelError, match="Qwen2VLForConditionalGeneration is not supported.*"
                                         "LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"):
        load_shape(tmp_path)
    data = json.loads((LLAVA_7B / "config.json").read_text())
    data["text_config"]["model_type"] = "gemma"
    with pytest.raises(ModelError,
                       match="model_type 'gemma' is not supported; supported: llama, mistral, qwen2"):
        load_shape(_write(tmp_path, json.dumps(data)))
