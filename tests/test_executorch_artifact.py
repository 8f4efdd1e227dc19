"""An XNNPACK fp32 ExecuTorch artifact answers exactly as the eager engine does under the same recipe.

One conversion per module (lowering is the slow part): a 2-layer tiny LLaVA whose recipe drops
visual tokens after both layers' attention, exported with the text-only prefill too.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edge_prune.cli import main
from edge_prune.converters.artifact import ArtifactWriter
from edge_prune.converters.executorch import ConvertOptions, convert
from edge_prune.engine import PrunedEngine
from edge_prune.errors import ArtifactError, InputError
from edge_prune.models.tiny import TinySpec, write_tiny_llava
from edge_prune.recipe import PruneSpec, Recipe
from edge_prune.runtimes import load, read_manifest
from edge_prune.runtimes.manifest import CONFIG_FILE, MANIFEST_FILE, sha256_file
from tests.conftest import PROMPTS

SCHEDULE = [0.5, 0.25]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    spec = TinySpec(num_layers=2, vision_layers=1)
    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny2", spec)


@pytest.fixture(scope="module")
def recipe(model_dir):
    from edge_prune.models.shapes import load_shape

    prune = PruneSpec(scorer="fitprune", keep_after=SCHEDULE)
    return Recipe(model=load_shape(model_dir).signature(), prune=prune)


@pytest.fixture(scope="module")
def artifact(model_dir, recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "fitprune-xnnpack"
    convert(model_dir, recipe, out, ConvertOptions(max_prompt_tokens=96, max_new_tokens=8, progress=False))
    return out


@pytest.fixture(scope="module")
def engine(model_dir, recipe):
    return PrunedEngine.load(model_dir, recipe=recipe)


def test_greedy_answers_equal_the_eager_engine(artifact, engine, images):
    session = load(artifact)
    for prompt, image in zip(PROMPTS, images):
        ours = session.generate(image, prompt, max_new_tokens=6)
        ref = engine.generate(prompt, image, max_new_tokens=6)
        assert ours.tokens == ref.tokens
        assert ours.text == ref.text
        np.testing.assert_allclose(ours.first_logits, ref.first_logits.numpy(), atol=1e-4)
        assert ours.kept[0].per_layer == ref.kept[0].per_layer == [32, 16]
        assert ours.kept[0].visual_tokens == 64 and ours.kept[0].exit_layer is None
        t = ours.timings
        assert t.vision_ms > 0 and t.prefill_ms > 0 and t.ttft_ms >= t.vision_ms + t.prefill_ms
        assert ours.peak_rss_mb > 10


def test_threads_sizes_the_threadpool_and_keeps_the_answers(artifact, images):
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    try:
        reference = load(artifact).generate(images[0], PROMPTS[0], max_new_tokens=4)
        session = load(artifact, threads=1)
        assert session.threads == 1 and portable_lib._threadpool_get_thread_count() == 1
        assert session.generate(images[0], PROMPTS[0], max_new_tokens=4).tokens == reference.tokens
    finally:
        portable_lib._unsafe_reset_threadpool(before)


def test_profile_runs_on_the_threads_asked_for(artifact, images, tmp_path, capsys):
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    images[0].save(tmp_path / "img.png")
    try:
        code = main(["profile", str(artifact), "--profile", "pixel-8", "--runs", "1", "--warmup", "0",
                     "--image", str(tmp_path / "img.png"), "--prompt", PROMPTS[0], "--threads", "1", "--json",
                     "--report", str(tmp_path / "report.html")])
        out = json.loads(capsys.readouterr().out)
        assert code in (0, 1) and out["threads"] == 1 and portable_lib._threadpool_get_thread_count() == 1
        for page in ("report.md", "report.html"):
            assert "Measured on 1 CPU thread." in (tmp_path / page).read_text()
    finally:
        portable_lib._unsafe_reset_threadpool(before)
    assert main(["profile", str(artifact), "--profile", "pixel-8", "--threads", "0"]) == 2
    assert "threads is 0" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4", 10_000])
def test_a_bad_thread_count_is_refused_and_changes_nothing(artifact, bad):
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    with pytest.raises(InputError, match="threads is"):
        load(artifact, threads=bad)
    assert portable_lib._threadpool_get_thread_count() == before


def test_text_only_prompt_is_not_pruned_and_matches(artifact, engine):
    ours = load(artifact).generate(None, "how many circles?", max_new_tokens=5)
    ref = engine.generate("how many circles?", None, max_new_tokens=5)
    assert ours.tokens == ref.tokens
    assert ours.kept[0].per_layer == [0, 0]


def test_manifest_describes_the_program(artifact, recipe):
    manifest = read_manifest(artifact)
    assert manifest.backend == "xnnpack" and manifest.quant == "none"
    files = {"model.pte", "recipe.json", "tokenizer.json", "chat_template.json", "preprocess.json", CONFIG_FILE}
    assert files <= set(manifest.files)
    assert manifest.versions["executorch"] and manifest.versions["torch"]
    program = manifest.extra["program"]
    assert program["seen"] == [64, 32] and program["kept"] == [32, 16]
    delegation = manifest.extra["delegation"]
    methods = {"vision_encoder", "token_embedding", "prefill", "prefill_text", "decode"}
    assert set(delegation["methods"]) == methods
    assert 0.3 < delegation["share"] <= 1.0
    assert Recipe.load(artifact / "recipe.json").prune.keep_after == recipe.prune.keep_after
    assert not list(artifact.parent.glob(".*tmp"))  # the temp dir was renamed into place


def test_cli_run_and_inspect_take_the_artifact(artifact, images, tmp_path, capsys):
    image = tmp_path / "img.png"
    images[1].save(image)
    assert main(["run", str(artifact), "--image", str(image), "--prompt", PROMPTS[0], "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"]["per_layer"] == [32, 16] and out["timings"]["ttft_ms"] > 0
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "xnnpack" in text and "delegated" in text and "prefill" in text


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _rehash(art):
    data = json.loads((art / MANIFEST_FILE).read_text())
    data["files"] = {rel: sha256_file(art / rel) for rel in data["files"]}
    (art / MANIFEST_FILE).write_text(json.dumps(data))
    return data


def test_truncated_pte_is_caught_by_the_manifest(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    pte = art / "model.pte"
    pte.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="model.pte does not match its manifest checksum"):
        load(art)


def test_corrupt_pte_with_a_matching_manifest_is_a_clear_error(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    pte = art / "model.pte"
    pte.write_bytes(b"\x00" * 64 + pte.read_bytes()[64:200])
    _rehash(art)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load(art)


def test_artifact_for_a_backend_this_runtime_lacks(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    data = json.loads((art / MANIFEST_FILE).read_text())
    data["backend"] = "vulkan"
    (art / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="VulkanBackend"):
        load(art)


def test_manifest_and_program_mismatch(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    data = json.loads((art / MANIFEST_FILE).read_text())
    data["extra"]["program"]["prefill_segments"] = [[0, 1], [1, 2]]
    (art / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="methods .*prefill_0.* are missing"):
        load(art)


def test_program_of_an_older_method_layout_is_refused(artifact, tmp_path):
    """Layout 1 programs ran the exit layer's visual MLP inside the candidate segment; this runtime would
    run it a second time, so it names the layout and asks for a re-conversion instead."""
    from edge_prune.runtimes.executorch import PROGRAM_LAYOUT, program_layout

    art = _copy(artifact, tmp_path)
    assert program_layout(art) == PROGRAM_LAYOUT
    data = json.loads((art / MANIFEST_FILE).read_text())
    del data["extra"]["program"]["layout"]
    (art / MANIFEST_FILE).write_text(json.dumps(data))
    assert program_layout(art) == 1
    with pytest.raises(ArtifactError, match="method layout is 1, this runtime runs layout 2.*re-run `edge-prune convert`"):
        load(art)


def test_prompt_limits_are_checked(artifact):
    session = load(artifact)
    with pytest.raises(InputError, match="max_new_tokens"):
        session.generate(None, "hi there", max_new_tokens=9)
    with pytest.raises(InputError, match="text tokens"):
        session.generate(None, "count " * 120, max_new_tokens=2)
    with pytest.raises(InputError, match="no image was given"):
        session.generate(None, "<image>\nwhat is it?", max_new_tokens=2)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match="ends with the image"):
        session.generate(image, "USER: what is it? <image>", max_new_tokens=2)


def test_convert_refuses_to_clobber(model_dir, recipe, artifact):
    with pytest.raises(ArtifactError, match="already exists"):
        convert(model_dir, recipe, artifact, ConvertOptions(progress=False))


def test_artifact_carries_the_checkpoints_config(artifact, model_dir, recipe, images, tmp_path, capsys):
    """config.json lets `edge-prune profile ARTIFACT` predict; profile also stays within this
    fixture's 8-token decode cap (it asks for 16 new tokens where the artifact has room)."""
    from edge_prune.models.shapes import load_shape

    assert CONFIG_FILE in read_manifest(artifact).files
    assert (artifact / CONFIG_FILE).read_bytes() == (model_dir / CONFIG_FILE).read_bytes()
    assert load_shape(artifact / CONFIG_FILE).signature() == recipe.model
    images[0].save(tmp_path / "img.png")
    code = main(["profile", str(artifact), "--profile", "pixel-8", "--runs", "1", "--warmup", "0",
                 "--image", str(tmp_path / "img.png"), "--prompt", PROMPTS[0], "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and out["measurement"]["runs"] == 1
    assert out["prediction"] is not None and out["prediction"]["ttft_ms"] > 0


# ---- ArtifactWriter -------------------------------------------------------------------------
def _write(target, overwrite=False, text="v1"):
    with ArtifactWriter(target, overwrite=overwrite) as art:
        art.write_text("model.bin", text)
        return art.commit(backend="xnnpack", quant="none")


def test_writer_takes_an_existing_empty_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # users often create the -o directory first
    assert set(_write(target).files) == {"model.bin"}
    assert read_manifest(target).files["model.bin"] == sha256_file(target / "model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old dirs left


def test_writer_refuses_a_non_artifact_and_needs_overwrite_for_an_artifact(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not an edge-prune artifact"):
            _write(busy, overwrite=overwrite)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    art = tmp_path / "art"
    _write(art)
    with pytest.raises(ArtifactError, match="already exists.*--overwrite"):
        _write(art, text="v2")
    _write(art, overwrite=True, text="v2")
    assert (art / "model.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "busy"]


def test_region_balanced_merged_recipe_runs_as_the_engine_does(model_dir, recipe, images, tmp_path):
    """prune.regions and prune.merge lowered: the round-robin rank, the merge's one-hot sums and the
    per-layer log sizes that decode adds (the tiny model's 8 x 8 grid in 4 x 4 regions)."""
    merged = Recipe(model=recipe.model, prune=PruneSpec(scorer="fitprune", keep_after=SCHEDULE, regions=4,
                                                       merge=True, fitprune_combine="either"))
    out = tmp_path / "merged"
    convert(model_dir, merged, out, ConvertOptions(max_prompt_tokens=96, max_new_tokens=8, progress=False))
    program = read_manifest(out).extra["program"]
    assert program["regions"] == 4 and program["merge"] is True
    session, engine = load(out), PrunedEngine.load(model_dir, recipe=merged)
    for prompt, image in zip(PROMPTS, images):
        ours = session.generate(image, prompt, max_new_tokens=6)
        ref = engine.generate(prompt, image, max_new_tokens=6)
        assert ours.tokens == ref.tokens
        np.testing.assert_allclose(ours.first_logits, ref.first_logits.numpy(), atol=1e-4)
        assert ours.kept[0].per_layer == ref.kept[0].per_layer == [32, 16]


def test_lookahead_exit_router_runs_as_the_engine_does(model_dir, recipe, images, tmp_path):
    """exit.lookahead lowered: prefill_exit_0 runs before the decision and returns p(exit); a request that
    stays runs layer 1 over the KV entries that run wrote, and may still exit at the last layer."""
    import torch

    from edge_prune.recipe import ExitSpec
    from edge_prune.scoring import ExitRouter

    sig = recipe.model
    router = ExitRouter(sig.hidden_size, [0, 1], 8, lookahead=True)
    router.reset_parameters(3)
    with torch.no_grad():  # make the lookahead statistics matter
        router.w1[:, 2 * sig.hidden_size:] *= 40
    router.save(tmp_path / "router.safetensors", sig.num_layers)

    def with_threshold(threshold: float) -> Recipe:
        spec = ExitSpec("router.safetensors", [0, 1], threshold, 8, lookahead=True)
        return Recipe.load(Recipe(model=sig, prune=recipe.prune, exit=spec).save(tmp_path / "recipe.json"))

    def exits(r: Recipe) -> list:
        out = PrunedEngine.load(model_dir, recipe=r).prefill(
            PrunedEngine.load(model_dir).adapter.prepare(PROMPTS, images))
        return [k.exit_layer for k in out.kept]

    # the threshold that gives the most different decisions over the three prompts
    chosen = max((t / 20 for t in range(1, 20)), key=lambda t: len(set(exits(with_threshold(t)))))
    lookahead = with_threshold(chosen)
    assert len(set(exits(lookahead))) >= 2
    out = tmp_path / "lookahead"
    convert(model_dir, lookahead, out, ConvertOptions(max_prompt_tokens=96, max_new_tokens=8, progress=False))
    assert read_manifest(out).extra["program"]["exit_lookahead"] is True
    assert_same_exits_and_answers(load(out), PrunedEngine.load(model_dir, recipe=lookahead), images)


def assert_same_exits_and_answers(session, engine: PrunedEngine, images) -> None:
    """The artifact's exit layer, greedy tokens and first logits equal the engine's on every prompt."""
    for prompt, image in zip(PROMPTS, images):
        ours = session.generate(image, prompt, max_new_tokens=6)
        ref = engine.generate(prompt, image, max_new_tokens=6)
        assert ours.kept[0].exit_layer == ref.kept[0].exit_layer
        assert ours.tokens == ref.tokens
        np.testing.assert_allclose(ours.first_logits, ref.first_logits.numpy(), atol=1e-4)


def test_frozen_exit_router_runs_as_the_engine_does(model_dir, recipe, images, tmp_path):
    """exit.frozen lowered: the segment ending at layer 0 also hands over the visual states before its MLP,
    prefill_exit_0 writes their keys and values into layer 1's cache, and decode reads them (the room a
    schedule that keeps dropping needs is in test_executorch_modules.py)."""
    from edge_prune.recipe import ExitSpec
    from edge_prune.scoring import ExitRouter

    sig = recipe.model
    router = ExitRouter(sig.hidden_size, [0, 1], 8)
    router.reset_parameters(3)
    router.save(tmp_path / "router.safetensors", sig.num_layers)

    def with_threshold(threshold: float) -> Recipe:
        spec = ExitSpec("router.safetensors", [0, 1], threshold, 8, frozen=True)
        return Recipe.load(Recipe(model=sig, prune=recipe.prune, exit=spec).save(tmp_path / "recipe.json"))

    adapter = PrunedEngine.load(model_dir).adapter
    batch = adapter.prepare(PROMPTS, images)

    def exits(r: Recipe) -> list:
        return [k.exit_layer for k in PrunedEngine(adapter, r).prefill(batch).kept]

    chosen = max((t / 20 for t in range(1, 20)), key=lambda t: len(set(exits(with_threshold(t)))))
    frozen = with_threshold(chosen)
    assert 0 in exits(frozen) and len(set(exits(frozen))) >= 2
    out = tmp_path / "frozen"
    convert(model_dir, frozen, out, ConvertOptions(max_prompt_tokens=96, max_new_tokens=8, progress=False))
    program = read_manifest(out).extra["program"]
    assert program["exit_frozen"] is True
    assert_same_exits_and_answers(load(out), PrunedEngine(adapter, frozen), images)
