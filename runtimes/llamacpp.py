"""llama.cpp runtime: run a GGUF LLaVA pair with the visual-token pruning llama.cpp's graph can express.

The image goes through llama.cpp's own multimodal encoder (libmtmd via llama-cpp-python), the
recipe's scorer picks the visual tokens at the input, and only the kept embeddings enter
`llama_decode` as an `embd` batch. llama.cpp cannot drop tokens inside its graph, so a mid-network
schedule (keep_after) is mapped to the input-level count whose KV cache holds as many visual
entries over all layers (see `plan_input_keep`); `result.kept` says when that happened. The
decode-time exit removes the visual tokens from the KV cache after prefill (llama_memory_seq_rm,
then llama_memory_seq_add closes the position gap).

Images are resized and centre-cropped as the checkpoint's CLIP processor does (with Pillow, when
installed) before llama.cpp's encoder sees them, so its visual tokens match transformers' for any
image size; without Pillow llama.cpp's own llava preprocessing (pad to square) applies.

Imports only numpy, psutil, llama_cpp (with its jinja2 for chat templates), optionally Pillow, and
edge-prune's torch-free recipe/manifest modules.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import llama_cpp
import numpy as np
import psutil
from llama_cpp import _logger as llama_logger
from llama_cpp import mtmd_cpp

from edge_prune.errors import ArtifactError, InputError, RecipeError
from edge_prune.recipe import Recipe, keep_count
from edge_prune.runtimes import check_threads
from edge_prune.runtimes import llamacpp_keys as K
from edge_prune.runtimes.manifest import Manifest

IMAGE_PLACEHOLDER = "<image>"
INPUT_SCORERS = ("pool", "random")
# Scorers that need a decoder layer's attention (or guides); llama.cpp exposes neither, so at the
# input they fall back to spatial pooling, the strongest language-agnostic input-level baseline.
INPUT_FALLBACK = {"fastv": "pool", "fitprune": "pool", "guide": "pool", "pool": "pool", "random": "random"}


# ---- results (field names as edge_prune.engine's, without torch) ---------------------------------
@dataclass
class Timings:
    vision_ms: float = 0.0  # llama.cpp's image encoder (its own preprocessing included) + input-level scoring
    prefill_ms: float = 0.0  # llama_decode over text + kept visual embeddings + first logits
    ttft_ms: float = 0.0  # preprocessing + vision + prefill + choosing the first token
    decode_tok_s: float = 0.0
    preprocess_ms: float = 0.0  # chat template + tokenization + image bitmap


@dataclass
class KeptTokens:
    """Visual tokens of one request. `input_level` is True when the recipe's mid-network schedule
    was mapped to one input-level count (`schedule` then holds the recipe's per-layer counts)."""

    visual_tokens: int
    entered_decoder: int
    per_layer: list[int]
    exit_layer: int | None = None
    input_level: bool = False
    schedule: list[int] | None = None
    scorer: str = "none"


@dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]
    kept: list[KeptTokens]
    timings: Timings
    first_logits: np.ndarray  # [1, vocab] logits of the prefill's last position
    prompt_lengths: list[int] = field(default_factory=list)  # tokens decoded in prefill, kept image included
    peak_rss_mb: float = 0.0  # process high-water mark (ru_maxrss) after this request
    kv_cache_bytes: int = 0  # llama_state_seq_get_size after prefill (and after the exit, if any)
    visual_kv_dropped: bool = False  # the decode-time exit removed the visual tokens from the KV cache

    @property
    def text(self) -> str:
        return self.texts[0]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens[0], "kept": asdict(self.kept[0]),
                "timings": asdict(self.timings), "peak_rss_mb": self.peak_rss_mb,
                "prompt_length": self.prompt_lengths[0], "kv_cache_bytes": self.kv_cache_bytes,
                "visual_kv_dropped": self.visual_kv_dropped}


# ---- options and the recipe -> llama.cpp mapping ---------------------------------------------------
@dataclass
class SessionOptions:
    """Knobs for one session; defaults follow the recipe inside the GGUF."""

    n_threads: int | None = None  # default: physical cores
    n_ctx: int = 0  # 0: the image's visual tokens + 1024
    n_batch: int = 512  # tokens per llama_decode call
    keep: float | None = None  # override: input-level keep fraction (benchmarks)
    input_scorer: str | None = None  # override: "pool" or "random"
    exit_after_prefill: bool = False  # drop the visual tokens from the KV cache after prefill
    exit_close_gap: bool = True  # shift later positions down after the exit (llama_memory_seq_add)
    mmproj: str | None = None  # another mmproj file (must match the language model)
    verbose: bool = False  # llama.cpp's own log


@dataclass
class InputPlan:
    """How the recipe runs in llama.cpp: one input-level keep fraction and scorer."""

    scorer: str  # "none", "pool" or "random"
    fraction: float | None  # None: derived per image from `recipe` (mapped schedule)
    recipe: Recipe | None
    seed: int = 0
    mapped: bool = False  # a mid-network schedule was mapped to the input

    def count(self, n_visual: int) -> tuple[int, list[int] | None]:
        """Visual tokens fed to the decoder for an image of n_visual tokens, and the schedule it replaces."""
        if self.fraction is not None:
            return keep_count(self.fraction, n_visual), None
        assert self.recipe is not None
        schedule = self.recipe.keep_counts(n_visual)
        # KV-equal mapping: layer i's cache holds the tokens its attention saw (the input count for
        # layer 0, schedule[i-1] after); feed the mean, so the cache over all layers is as large.
        entering = [self.recipe.input_count(n_visual), *schedule[:-1]]
        return int(round(sum(entering) / len(entering))), schedule


def plan_input_keep(recipe: Recipe | None, keep: float | None = None, input_scorer: str | None = None) -> InputPlan:
    """Map a recipe (or an explicit keep fraction) to what llama.cpp can do: drop at the input only."""
    if input_scorer is not None and input_scorer not in INPUT_SCORERS:
        raise InputError(f"input_scorer {input_scorer!r}; expected one of {', '.join(INPUT_SCORERS)}")
    seed = recipe.prune.seed if recipe is not None else 0
    if keep is not None:
        if not 0.0 < keep <= 1.0:
            raise InputError(f"keep is {keep}; expected a fraction in (0, 1]")
        return InputPlan(scorer=input_scorer or "pool" if keep < 1.0 else "none", fraction=keep, recipe=recipe, seed=seed)
    if recipe is None or recipe.is_identity:
        return InputPlan(scorer="none", fraction=1.0, recipe=recipe, seed=seed)
    scorer = input_scorer or INPUT_FALLBACK.get(recipe.prune.scorer, "pool")
    mid_network = any(k < recipe.prune.keep_input for k in recipe.prune.keep_after)
    if not mid_network:
        return InputPlan(scorer=scorer, fraction=recipe.prune.keep_input, recipe=recipe, seed=seed)
    return InputPlan(scorer=scorer, fraction=None, recipe=recipe, seed=seed, mapped=True)


def pool_tokens(features: np.ndarray, target: int) -> np.ndarray:
    """Spatial average pooling of [n, d] visual tokens to `target`, as edge_prune.scoring.pool_visual:
    2-D adaptive pooling when a square grid pools to a square or rows x (rows+1) grid, else along the sequence."""
    n, d = features.shape
    if target >= n:
        return features
    side, rows = math.isqrt(n), math.isqrt(target)
    grid = None
    if side * side == n and rows > 0:
        grid = next(((rows, c) for c in (rows, rows + 1) if rows * c == target and c <= side), None)
    if grid is None:
        return _adaptive_mean(features, target, axis=0)
    x = features.reshape(side, side, d)
    x = _adaptive_mean(x, grid[0], axis=0)
    x = _adaptive_mean(x, grid[1], axis=1)
    return x.reshape(target, d)


def _adaptive_mean(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """torch's adaptive average pooling along one axis: bin i covers [floor(i*n/out), ceil((i+1)*n/out))."""
    n = x.shape[axis]
    bins = [np.take(x, range((i * n) // out, -((-(i + 1) * n) // out)), axis=axis).mean(axis=axis) for i in range(out)]
    return np.stack(bins, axis=axis).astype(x.dtype)


def position_hash_uniform(seed: int, layer: int, positions: np.ndarray) -> np.ndarray:
    """edge_prune.scoring.position_hash_uniform in numpy: the random scorer's ranking, reproducible anywhere."""
    x = (positions.astype(np.int64) * 2654435761 + seed * 97531 + layer * 7919) % 2**32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) % 2**32
    x = x ^ (x >> 16)
    return (x.astype(np.float64) / 2**32).astype(np.float32)


@dataclass
class _Bitmap:
    """An RGB image in llama.cpp's multimodal input format (mtmd_bitmap pointer)."""

    ptr: Any


# ---- the session --------------------------------------------------------------------------------
_BACKEND_READY = False


def _init_backend(verbose: bool) -> None:
    global _BACKEND_READY
    llama_logger.set_verbose(verbose)
    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        _BACKEND_READY = True


def open_session(path: str | os.PathLike[str], manifest: Manifest | None = None, **options: Any) -> LlamaCppSession:
    """Open an artifact directory written by `edge-prune convert --format gguf` (manifest already verified)."""
    root = Path(path)
    extra = manifest.extra if manifest is not None else {}
    lm = root / extra.get("lm_file", K.LM_FILE)
    mmproj = Path(options.pop("mmproj", None) or root / extra.get("mmproj_file", K.MMPROJ_FILE))
    _threads_option(options)
    session = LlamaCppSession(lm, mmproj, SessionOptions(**options))
    if manifest is not None and extra.get("pair_id") and session.pair_id and extra["pair_id"] != session.pair_id:
        raise ArtifactError(f"{lm}: pair id {session.pair_id} differs from the manifest's {extra['pair_id']}; "
                            "the artifact directory mixes files of two conversions, re-run `edge-prune convert`")
    return session


def _threads_option(options: dict[str, Any]) -> None:
    """`threads`, the name every runtime takes (edge_prune.runtimes.load), as llama.cpp's n_threads."""
    threads = options.pop("threads", None)
    if threads is None:
        return
    if options.get("n_threads") is not None:
        raise InputError("give threads or n_threads, not both (they are the same setting)")
    options["n_threads"] = check_threads(threads)


def open_gguf(lm_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str], **options: Any) -> LlamaCppSession:
    """Open a bare GGUF pair (no artifact directory), e.g. a stock llama.cpp LLaVA download."""
    _threads_option(options)
    return LlamaCppSession(Path(lm_path), Path(mmproj_path), SessionOptions(**options))


class LlamaCppSession:
    """One loaded GGUF pair: model, context, multimodal encoder, and the input-level pruning plan."""

    def __init__(self, lm_path: Path, mmproj_path: Path, options: SessionOptions):
        self.options = options
        self.lm_path, self.mmproj_path = lm_path, mmproj_path
        for p in (lm_path, mmproj_path):
            if not p.is_file():
                raise ArtifactError(f"GGUF file not found: {p}")
        _init_backend(options.verbose)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(lm_path).encode(), mparams)
        if not self._model:
            raise ArtifactError(f"{lm_path}: llama.cpp could not load this GGUF (truncated, corrupt, or an "
                                "architecture it does not know); re-run `edge-prune convert` or copy the file again")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.meta = self._read_meta()
        self.pair_id = self.meta.get(K.KEY_PAIR_ID)
        self.recipe = self._read_recipe()
        self.plan = plan_input_keep(self.recipe, options.keep, options.input_scorer)
        self.image_token_id = self._image_token_id()
        self.chat_template = self.meta.get("tokenizer.chat_template")
        self.n_threads = options.n_threads or psutil.cpu_count(logical=False) or 1
        self._mtmd = self._open_mmproj(mmproj_path)
        n_visual = int(self.meta.get(K.KEY_NUM_VISUAL_TOKENS, 0)) or 2048
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = options.n_ctx or n_visual + 1024
        cparams.n_batch = cparams.n_ubatch = options.n_batch
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ArtifactError(f"{lm_path}: llama.cpp could not create a context (n_ctx {cparams.n_ctx}); lower n_ctx")
        self.n_ctx = cparams.n_ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._tok_batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self._emb_batch = llama_cpp.llama_batch_init(options.n_batch, self.n_embd, 1)

    # ---- loading helpers ---------------------------------------------------------------------
    def _read_meta(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in range(llama_cpp.llama_model_meta_count(self._model)):
            out[self._meta_str(llama_cpp.llama_model_meta_key_by_index, i)] = self._meta_str(
                llama_cpp.llama_model_meta_val_str_by_index, i)
        return out

    def _meta_str(self, fn: Any, i: int) -> str:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = fn(self._model, i, buf, size)
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _read_recipe(self) -> Recipe | None:
        text = self.meta.get(K.KEY_RECIPE)
        if text is None:
            warnings.warn(f"{self.lm_path.name} has no {K.KEY_RECIPE} key (not written by edge-prune); "
                          "running unpruned", stacklevel=3)
            return None
        try:
            recipe = Recipe.from_dict(json.loads(text), source=f"{self.lm_path.name}:{K.KEY_RECIPE}")
        except (json.JSONDecodeError, RecipeError) as exc:
            raise ArtifactError(f"{self.lm_path}: key {K.KEY_RECIPE} holds no valid recipe ({exc}); "
                                "re-run `edge-prune convert`") from exc
        if recipe.exit is not None and not self.options.exit_after_prefill:
            warnings.warn("the recipe's exit router reads a decoder layer's hidden states, which llama.cpp does "
                          "not expose; running without per-request exits (exit_after_prefill=True drops the "
                          "visual tokens from the KV cache after prefill instead)", stacklevel=3)
        return recipe

    def _image_token_id(self) -> int | None:
        if K.KEY_IMAGE_TOKEN_ID in self.meta:
            return int(self.meta[K.KEY_IMAGE_TOKEN_ID])
        ids = self._tokenize(IMAGE_PLACEHOLDER, add_special=False)
        return ids[0] if len(ids) == 1 else None

    def _open_mmproj(self, path: Path) -> Any:
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = self.n_threads
        params.warmup = False
        ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), self._model, params)
        if not ctx:
            raise ArtifactError(
                f"{path}: llama.cpp's multimodal encoder could not load this mmproj (truncated or corrupt "
                f"file, or its projector output does not match the language model's {self.n_embd}-wide "
                "embeddings); use the mmproj converted together with this model"
            )
        if not mtmd_cpp.mtmd_support_vision(ctx):
            mtmd_cpp.mtmd_free(ctx)
            raise ArtifactError(f"{path}: this mmproj has no vision encoder")
        mm_pair = _mmproj_pair_id(path)
        if self.pair_id and mm_pair and mm_pair != self.pair_id:
            mtmd_cpp.mtmd_free(ctx)
            raise ArtifactError(f"{path} belongs to another conversion (pair id {mm_pair}, model {self.pair_id}); "
                                "use the mmproj converted together with this model")
        return ctx

    def close(self) -> None:
        """Free llama.cpp's objects (also done at garbage collection)."""
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._tok_batch)
            llama_cpp.llama_batch_free(self._emb_batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_mtmd", None):
            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    # ---- text ------------------------------------------------------------------------------------
    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, True)
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self._vocab, int(t), buf, 256, 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def format_prompt(self, prompt: str, with_image: bool) -> str:
        """The checkpoint's chat template (from the GGUF) around a plain question; templated prompts pass through."""
        if IMAGE_PLACEHOLDER in prompt:
            if not with_image:
                raise InputError("the prompt contains <image> but no image was given")
            return prompt
        if not self.chat_template:
            return f"{IMAGE_PLACEHOLDER}\n{prompt}" if with_image else prompt
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # llama-cpp-python's own dependency

        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)

    # ---- image -------------------------------------------------------------------------------------
    def encode_image(self, image: Any) -> np.ndarray:
        """[n_visual, n_embd] projected visual tokens from llama.cpp's multimodal encoder (frees `image`
        when it is a bitmap from `_bitmap`)."""
        bitmap = image if isinstance(image, _Bitmap) else self._bitmap(image)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap.ptr)
            rc = mtmd_cpp.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise InputError(f"llama.cpp's multimodal tokenizer rejected the image (code {rc})")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                if mtmd_cpp.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                    raise InputError("llama.cpp's image encoder failed on this image")
                ptr = mtmd_cpp.mtmd_get_output_embd(self._mtmd)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            raise InputError("llama.cpp's multimodal tokenizer produced no image chunk")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap.ptr)

    def _bitmap(self, image: Any) -> _Bitmap:
        """An image as llama.cpp's encoder input, resized and centre-cropped as the checkpoint's processor does.

        Pillow (when installed) decodes files and does the resize; without it llama.cpp decodes the file
        and applies its own llava preprocessing (padding non-square images to a square)."""
        try:
            from PIL import Image
        except ImportError:
            Image = None
        if isinstance(image, (str, Path)):
            p = Path(image)
            if not p.is_file():
                raise InputError(f"image file not found: {p}")
            if Image is None:
                bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_file(self._mtmd, str(p).encode(), False)
                if not bitmap:
                    raise InputError(f"{p} is not a readable image; pass a PNG or JPEG file")
                return _Bitmap(bitmap)
            try:
                with Image.open(p) as im:
                    image = im.convert("RGB")
            except (OSError, ValueError) as exc:
                raise InputError(f"{p} is not a readable image ({exc}); pass a PNG or JPEG file") from exc
        if isinstance(image, np.ndarray) and Image is not None and image.ndim == 3 and image.shape[2] in (3, 4):
            image = Image.fromarray(image[..., :3].astype(np.uint8))
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            image = np.asarray(self._resize_and_crop(image.convert("RGB")))
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"image of type {type(image).__name__}; pass a path, a PIL image or an HxWx3 uint8 array")
        rgb = np.ascontiguousarray(image[..., :3].astype(np.uint8))
        h, w = rgb.shape[:2]
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        return _Bitmap(mtmd_cpp.mtmd_bitmap_init(w, h, data))

    def _resize_and_crop(self, image: Any) -> Any:
        """CLIP processor steps (bicubic shortest-edge resize, centre crop) on a PIL image."""
        edge = int(self.meta.get(K.KEY_RESIZE_SHORTEST_EDGE, 0))
        crop = int(self.meta.get(K.KEY_CROP_SIZE, 0))
        w, h = image.size
        if edge and min(w, h) != edge:
            scale = edge / min(w, h)
            w, h = (edge, max(1, int(h * scale))) if w <= h else (max(1, int(w * scale)), edge)
            image = image.resize((w, h), resample=3)  # PIL.Image.BICUBIC, as CLIP's processor
        if crop and (w, h) != (crop, crop):
            left, top = (w - crop) // 2, (h - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        return image

    def select_visual(self, features: np.ndarray) -> tuple[np.ndarray, KeptTokens]:
        """Input-level pruning: the embeddings to feed (consecutive positions) and what was kept."""
        n = features.shape[0]
        target, schedule = self.plan.count(n)
        target = max(0, min(n, target))
        scorer = self.plan.scorer if target < n else "none"
        if scorer == "pool":
            kept = pool_tokens(features, target)
        elif scorer == "random":
            scores = position_hash_uniform(self.plan.seed, _first_drop_layer(self.recipe), np.arange(n))
            order = np.argsort(-scores, kind="stable")[:target]
            kept = features[np.sort(order)]
        else:
            kept = features
        info = KeptTokens(visual_tokens=n, entered_decoder=len(kept), per_layer=[len(kept)] * self.n_layer,
                          input_level=self.plan.mapped, schedule=schedule, scorer=scorer)
        return kept, info

    # ---- decoding ----------------------------------------------------------------------------------
    def _decode_tokens(self, tokens: Sequence[int], start: int, want_logits: bool) -> int:
        b = self._tok_batch
        for off in range(0, len(tokens), self.options.n_batch):
            part = tokens[off:off + self.options.n_batch]
            b.n_tokens = len(part)
            for j, t in enumerate(part):
                b.token[j], b.pos[j], b.n_seq_id[j], b.seq_id[j][0] = t, start + off + j, 1, 0
                b.logits[j] = 0
            if want_logits and off + len(part) == len(tokens):
                b.logits[len(part) - 1] = 1
            self._check(llama_cpp.llama_decode(self._ctx, b))
        return start + len(tokens)

    def _decode_embeddings(self, embd: np.ndarray, start: int, want_logits: bool) -> int:
        b = self._emb_batch
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        dst = np.ctypeslib.as_array(b.embd, shape=(self.options.n_batch * self.n_embd,))
        for off in range(0, len(embd), self.options.n_batch):
            part = embd[off:off + self.options.n_batch]
            b.n_tokens = len(part)
            dst[: part.size] = part.reshape(-1)
            for j in range(len(part)):
                b.pos[j], b.n_seq_id[j], b.seq_id[j][0], b.logits[j] = start + off + j, 1, 0, 0
            if want_logits and off + len(part) == len(embd):
                b.logits[len(part) - 1] = 1
            self._check(llama_cpp.llama_decode(self._ctx, b))
        return start + len(embd)

    def _check(self, rc: int) -> None:
        if rc == 1:
            raise InputError(f"the prompt does not fit llama.cpp's context of {self.n_ctx} tokens; open the "
                             "session with a larger n_ctx")
        if rc != 0:
            raise ArtifactError(f"llama_decode failed with code {rc}")

    def _logits(self) -> np.ndarray:
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32, stop_at_eos: bool = True) -> GenerationResult:
        """Greedy answer to `prompt` about `image` (None for a text-only prompt, which is never pruned).

        `stop_at_eos=False` keeps decoding to max_new_tokens (decode-speed measurements)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens is {max_new_tokens}; expected at least 1")
        t0 = time.perf_counter()
        text = self.format_prompt(prompt, image is not None)
        ids = self._tokenize(text, add_special=True)
        n_img = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if image is not None and n_img != 1:
            raise InputError(f"the prompt holds {n_img} <image> placeholders; the llama.cpp runtime runs one image "
                             "per prompt")
        if image is None and n_img:
            raise InputError("the prompt holds an <image> token but no image was given")
        llama_cpp.llama_memory_clear(self._mem, True)
        kept_info = KeptTokens(visual_tokens=0, entered_decoder=0, per_layer=[0] * self.n_layer)
        bitmap = self._bitmap(image) if image is not None else None
        start = time.perf_counter()
        vision_ms = 0.0
        if bitmap is not None:
            features = self.encode_image(bitmap)
            visual, kept_info = self.select_visual(features)
            vision_ms = (time.perf_counter() - start) * 1000
            cut = ids.index(self.image_token_id)
            before, after = ids[:cut], ids[cut + 1:]
        else:
            visual, before, after = np.zeros((0, self.n_embd), np.float32), ids, []
        t1 = time.perf_counter()
        pos = self._decode_tokens(before, 0, want_logits=not len(visual) and not after)
        img_start = pos
        if len(visual):
            pos = self._decode_embeddings(visual, pos, want_logits=not after)
        img_end = pos
        if after:
            pos = self._decode_tokens(after, pos, want_logits=True)
        logits = self._logits()
        t2 = time.perf_counter()
        token = int(np.argmax(logits))
        ttft_ms = (time.perf_counter() - t0) * 1000
        kv_bytes = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
        dropped = False
        if self.options.exit_after_prefill and img_end > img_start:
            if not llama_cpp.llama_memory_seq_rm(self._mem, 0, img_start, img_end):
                raise ArtifactError("llama.cpp could not remove the visual tokens from its KV cache")
            if self.options.exit_close_gap:
                llama_cpp.llama_memory_seq_add(self._mem, 0, img_end, -1, -(img_end - img_start))
                pos -= img_end - img_start
            kv_bytes = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
            dropped = True
        out = [token]
        decode_start = time.perf_counter()
        while len(out) < max_new_tokens and not (stop_at_eos and llama_cpp.llama_vocab_is_eog(self._vocab, token)):
            pos = self._decode_tokens([token], pos, want_logits=True)
            token = int(np.argmax(self._logits()))
            out.append(token)
        decode_s = time.perf_counter() - decode_start
        steps = len(out) - 1
        eos_at = next((i for i, t in enumerate(out) if llama_cpp.llama_vocab_is_eog(self._vocab, t)), len(out))
        answer = out[:eos_at]
        timings = Timings(vision_ms=vision_ms, prefill_ms=(t2 - t1) * 1000, ttft_ms=ttft_ms,
                          decode_tok_s=steps / decode_s if steps and decode_s > 0 else 0.0,
                          preprocess_ms=(start - t0) * 1000)
        return GenerationResult(
            texts=[self.detokenize(answer).strip()], tokens=[out], kept=[kept_info], timings=timings,
            first_logits=logits[None], prompt_lengths=[img_end + len(after)],
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kv_cache_bytes=kv_bytes,
            visual_kv_dropped=dropped,
        )


def _first_drop_layer(recipe: Recipe | None) -> int:
    """The layer the engine's random scorer would key its first drop by (0 without a schedule)."""
    if recipe is None:
        return 0
    before = [recipe.prune.keep_input, *recipe.prune.keep_after[:-1]]
    return next((i for i, (b, a) in enumerate(zip(before, recipe.prune.keep_after)) if a < b), 0)


def _mmproj_pair_id(path: Path) -> str | None:
    """The mmproj's edge_prune.pair_id, read with gguf-py when the device has it (optional check)."""
    try:
        from gguf.gguf_reader import GGUFReader
    except ImportError:
        return None
    try:
        field_ = GGUFReader(str(path)).get_field(K.KEY_MMPROJ_PAIR_ID)
    except (ValueError, OSError):
        return None
    return None if field_ is None else str(field_.contents())
