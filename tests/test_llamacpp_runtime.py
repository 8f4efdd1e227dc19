"""The llama.cpp runtime on a converted tiny checkpoint: fidelity to the engine, input-level pruning,
the decode-time exit, and bad artifacts.

Tiny spec: TinySpec() (llama decoder, hidden 64, 4 heads of 16, 2 KV heads; CLIP 32 wide, 4 heads
of 8; 8x8 = 64 visual tokens) - llama.cpp accepts these head sizes on CPU.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from edge_prune.converters.gguf import convert_gguf  # noqa: E402
from edge_prune.engine import PrunedEngine  # noqa: E402
from edge_prune.errors import ArtifactError, InputError  # noqa: E402
from edge_prune.models.shapes import load_shape  # noqa: E402
from edge_prune.models.tiny import TinySpec, write_tiny_llava  # noqa: E402
from edge_prune.recipe import PruneSpec, Recipe  # noqa: E402
from edge_prune.runtimes import llamacpp_keys as K  # noqa: E402
from edge_prune.runtimes import load, read_manifest  # noqa: E402
from edge_prune.runtimes.llamacpp import open_gguf, plan_input_keep, pool_tokens  # noqa: E402
from edge_prune.runtimes.manifest import CONFIG_FILE  # noqa: E402

PROMPT = "what colour is the square?"


@pytest.fixture(scope="module")
def artifact(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llamacpp") / "f16"
    convert_gguf(tiny_llava_dir, out, quant="f16", progress=False)
    return out


@pytest.fixture(scope="module")
def session(artifact):
    return load(artifact, n_threads=2)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return PrunedEngine.load(tiny_llava_dir)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_llamacpp_encoder_matches_transformers_features(session, engine, images):
    """llama.cpp's own CLIP+projector on our mmproj gives transformers' visual tokens (CLS-less tower)."""
    batch = engine.adapter.prepare([PROMPT], [images[0]])
    ref = engine.adapter.image_features(batch).float().numpy()
    got = session.encode_image(np.asarray(images[0]))
    assert got.shape == ref.shape == (64, 64)
    assert _cos(got, ref).min() > 0.98


def test_tokenizer_matches_transformers(session, engine):
    text = "USER: <image>\nhow many circles are left of the red square? ASSISTANT:"
    hf = engine.adapter.processor.tokenizer(text).input_ids
    assert session._tokenize(text, add_special=True) == hf
    assert session.format_prompt(PROMPT, True) == engine.adapter.format_prompt(PROMPT, True)


def test_unpruned_answer_and_logits_match_the_engine(session, engine, images):
    res = session.generate(images[0], PROMPT, max_new_tokens=6)
    ref = engine.generate(PROMPT, images[0], max_new_tokens=6)
    a, b = res.first_logits[0], ref.first_logits[0].numpy()
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    assert int(a.argmax()) == int(b.argmax())
    kept = res.kept[0]
    assert (kept.visual_tokens, kept.entered_decoder, kept.per_layer) == (64, 64, [64] * 4)
    assert not kept.input_level and kept.exit_layer is None
    t = res.timings
    assert t.ttft_ms >= t.vision_ms + t.prefill_ms * 0.99 > 0 and res.peak_rss_mb > 0


def test_input_pooling_matches_the_engine_pool_recipe(tiny_llava_dir, tmp_path, images):
    sig = load_shape(tiny_llava_dir).signature()
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="pool", keep_input=0.25, keep_after=[0.25] * 4))
    convert_gguf(tiny_llava_dir, tmp_path / "pool", recipe=recipe, progress=False)
    res = load(tmp_path / "pool", n_threads=2).generate(images[0], PROMPT, max_new_tokens=4)
    ref = PrunedEngine.load(tiny_llava_dir, recipe=recipe).generate(PROMPT, images[0], max_new_tokens=4)
    assert res.kept[0].entered_decoder == ref.kept[0].entered_decoder == 16
    a, b = res.first_logits[0], ref.first_logits[0].numpy()
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_numpy_pooling_is_torchs_adaptive_pooling():
    from edge_prune.scoring import pool_visual

    x = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    for target in (16, 20, 32, 7):  # square grid, rows x rows+1 grid, and two sequence poolings
        ref = pool_visual(torch.from_numpy(x), target).numpy()
        assert np.allclose(pool_tokens(x, target), ref, atol=1e-6), target


def test_mid_network_schedule_maps_to_a_kv_equal_input_count(tiny_llava_dir):
    sig = load_shape(tiny_llava_dir).signature()
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.5, 0.5, 0.5]))
    plan = plan_input_keep(recipe)
    count, schedule = plan.count(64)
    assert plan.mapped and plan.scorer == "pool"
    assert schedule == [64, 32, 32, 32] and count == round((64 + 64 + 32 + 32) / 4)


def test_mapped_schedule_is_reported_in_kept(tiny_llava_dir, tmp_path, images):
    sig = load_shape(tiny_llava_dir).signature()
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="fastv", keep_after=[1.0, 0.25, 0.25, 0.25]))
    convert_gguf(tiny_llava_dir, tmp_path / "fastv", recipe=recipe, progress=False)
    kept = load(tmp_path / "fastv", n_threads=2).generate(images[0], PROMPT, max_new_tokens=2).kept[0]
    assert kept.input_level and kept.schedule == [64, 16, 16, 16]
    assert kept.entered_decoder == 40 and kept.per_layer == [40] * 4 and kept.scorer == "pool"


def test_keep_override_and_random_scorer(artifact, images):
    s = load(artifact, n_threads=2, keep=0.5, input_scorer="random")
    res = s.generate(images[0], PROMPT, max_new_tokens=2)
    assert res.kept[0].entered_decoder == 32 and res.kept[0].scorer == "random"
    assert res.prompt_lengths[0] < load(artifact, n_threads=2).generate(images[0], PROMPT, 1).prompt_lengths[0]


def test_exit_after_prefill_frees_the_visual_kv(artifact, images):
    base = load(artifact, n_threads=2).generate(images[0], PROMPT, max_new_tokens=5)
    for close_gap in (True, False):
        s = load(artifact, n_threads=2, exit_after_prefill=True, exit_close_gap=close_gap)
        res = s.generate(images[0], PROMPT, max_new_tokens=5)
        assert res.visual_kv_dropped and res.kv_cache_bytes < base.kv_cache_bytes * 0.5
        assert res.tokens[0][0] == base.tokens[0][0]  # the first token comes from the full prefill


def test_threads_is_llamacpps_thread_count(artifact, images):
    """Every runtime takes `threads`; llama.cpp's session runs on that many, and a bad count is refused."""
    s = load(artifact, threads=1)
    assert s.n_threads == 1
    assert s.generate(images[0], PROMPT, max_new_tokens=3).tokens == \
        load(artifact, n_threads=2).generate(images[0], PROMPT, max_new_tokens=3).tokens
    with pytest.raises(InputError, match="not both"):
        load(artifact, threads=1, n_threads=2)
    with pytest.raises(InputError, match="threads is 0"):
        load(artifact, threads=0)


def test_text_only_prompt_is_not_pruned(artifact):
    res = load(artifact, n_threads=2, keep=0.25).generate(None, PROMPT, max_new_tokens=3)
    assert res.kept[0].visual_tokens == 0 and len(res.tokens[0]) >= 1


def test_bad_requests(session, images):
    with pytest.raises(InputError, match="<image>"):
        session.generate(None, "USER: <image>\nhi ASSISTANT:")
    with pytest.raises(InputError, match="2 <image>"):
        session.generate(images[0], "USER: <image><image>\nhi ASSISTANT:")
    with pytest.raises(InputError, match="not found"):
        session.generate("/nonexistent.png", PROMPT)


def _strip_edge_prune_keys(src, dst):
    """Copy a GGUF without its edge_prune.* keys: what a stock converter would have written."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), reader.get_field("general.architecture").contents())
    for name, f in reader.fields.items():
        if name.startswith(("GGUF.", "edge_prune.", "general.architecture")):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(x) for x in t.shape])),
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_without_edge_prune_keys_runs_unpruned_with_a_warning(artifact, tmp_path, images):
    stock = tmp_path / "stock.gguf"
    _strip_edge_prune_keys(artifact / K.LM_FILE, stock)
    with pytest.warns(UserWarning, match="running unpruned"):
        s = open_gguf(stock, artifact / K.MMPROJ_FILE, n_threads=2, keep=None)
    assert s.recipe is None
    res = s.generate(images[0], PROMPT, max_new_tokens=3)
    assert res.kept[0].entered_decoder == 64


def test_truncated_gguf_is_a_clear_error(artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    data = (art / K.LM_FILE).read_bytes()
    (art / K.LM_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="checksum"):
        load(art)
    with pytest.raises(ArtifactError, match="could not load this GGUF"):
        open_gguf(art / K.LM_FILE, art / K.MMPROJ_FILE, n_threads=2)
    data = (art / K.MMPROJ_FILE).read_bytes()
    (art / K.MMPROJ_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="could not load this mmproj"):
        open_gguf(artifact / K.LM_FILE, art / K.MMPROJ_FILE, n_threads=2)


def test_mmproj_of_another_model_is_a_clear_error(artifact, tmp_path):
    wide = write_tiny_llava(tmp_path / "wide", TinySpec(hidden_size=96, intermediate_size=192))
    convert_gguf(wide, tmp_path / "wide-art", progress=False)
    with pytest.raises(ArtifactError, match="mmproj"):
        open_gguf(artifact / K.LM_FILE, tmp_path / "wide-art" / K.MMPROJ_FILE, n_threads=2)
    same_size = write_tiny_llava(tmp_path / "seed1", TinySpec(seed=1))
    convert_gguf(same_size, tmp_path / "seed1-art", progress=False)
    with pytest.raises(ArtifactError, match="another conversion"):
        open_gguf(artifact / K.LM_FILE, tmp_path / "seed1-art" / K.MMPROJ_FILE, n_threads=2)


def test_q4_k_m_uses_llamacpps_quantizer(tiny_llava_dir, tmp_path, images):
    result = convert_gguf(tiny_llava_dir, tmp_path / "q4km", quant="q4_k_m", progress=False)
    types = result.tensor_types[K.LM_FILE]
    # rows of 64 are not a multiple of the 256-wide K-quant block: llama.cpp picks its fallback types
    assert "F16" not in types and set(types) - {"F32"}, types
    meta = json.loads((tmp_path / "q4km" / "manifest.json").read_text())
    assert meta["quant"] == "q4_k_m"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe keys survive llama.cpp's quantizer: no warning
        s = load(tmp_path / "q4km", n_threads=2)
    assert s.recipe is not None and s.generate(images[0], PROMPT, max_new_tokens=2).tokens[0]


def test_guide_weights_travel_in_the_mmproj(tiny_llava_dir, tmp_path, images):
    """Stock llama.cpp rejects extra tensors in the language-model GGUF, clip.cpp ignores them in the mmproj."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    from edge_prune.recipe import GuideSpec

    sig = load_shape(tiny_llava_dir).signature()
    folder = tmp_path / "recipe"
    folder.mkdir()
    save_file({"layers.1.q.weight": np.ones((4, 64), np.float32)}, str(folder / "guides.safetensors"))
    recipe = Recipe(model=sig, prune=PruneSpec(scorer="guide", keep_after=[1.0, 0.5, 0.5, 0.5],
                                               guides=GuideSpec(file="guides.safetensors", layers=[1], rank=4)))
    recipe.save(folder / "recipe.json")
    convert_gguf(tiny_llava_dir, tmp_path / "art", recipe=folder / "recipe.json", progress=False)
    names = {t.name for t in GGUFReader(str(tmp_path / "art" / K.MMPROJ_FILE)).tensors}
    assert "edge_prune.guide.layers.1.q.weight" in names
    assert (tmp_path / "art" / "guides.safetensors").is_file()  # recipe.json in the artifact stays loadable
    kept = load(tmp_path / "art", n_threads=2).generate(images[0], PROMPT, max_new_tokens=2).kept[0]
    assert kept.input_level and kept.scorer == "pool" and kept.entered_decoder == (64 + 64 + 32 + 32) // 4


def test_cli_convert_and_run_an_artifact(tiny_llava_dir, tmp_path, images, capsys):
    from edge_prune.cli import main

    out = tmp_path / "cli-art"
    assert main(["convert", str(tiny_llava_dir), "--format", "gguf", "--quant", "q8_0", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quant"] == "q8_0"
    assert main(["convert", str(tiny_llava_dir), "--format", "gguf", "-o", str(out)]) == 2  # exists, no --overwrite
    capsys.readouterr()
    images[1].save(tmp_path / "img.png")
    assert main(["run", str(out), "--image", str(tmp_path / "img.png"), "--prompt", PROMPT, "--json",
                 "--max-new-tokens", "3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    ref = PrunedEngine.load(tiny_llava_dir).generate(PROMPT, tmp_path / "img.png", max_new_tokens=3)
    assert shown["tokens"][0] == ref.tokens[0][0] and shown["kept"]["entered_decoder"] == 64


def test_profile_of_an_artifact_predicts_from_its_config(artifact, images, tmp_path, capsys):
    """The artifact carries its checkpoint's config.json, so `profile` predicts as well as measures."""
    from edge_prune.cli import main

    assert CONFIG_FILE in read_manifest(artifact).files
    images[0].save(tmp_path / "img.png")
    code = main(["profile", str(artifact), "--profile", "pixel-8", "--runs", "1", "--warmup", "0",
                 "--image", str(tmp_path / "img.png"), "--prompt", PROMPT, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and out["measurement"]["runs"] == 1
    assert out["prediction"] is not None and out["prediction"]["ttft_ms"] > 0
