"""Run an ExecuTorch artifact on the device: preprocessing, tokenization, and the recipe-pruned program.

The runner knows only the method names and the program facts the converter wrote into the
manifest (`ProgramSpec`), never how the program was made. Imports need numpy, psutil and a
tokenizer only; `executorch.runtime` is imported when a session opens.

Note on torch: the executorch *pip wheel's* Python bindings link libtorch and exchange torch
tensors (they reject numpy arrays), and `executorch.extension.pybindings.portable_lib` imports
torch itself. So opening a session with the pip runtime loads torch; importing this module
does not. A device build of the C++ runner (`extension/llm/runner`) has no torch at all; it
reads the same .pte and the same method contract documented in ProgramSpec.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_prune.errors import ArtifactError, InputError
from edge_prune.recipe import router_exits
from edge_prune.runtimes import check_threads
from edge_prune.runtimes.manifest import Manifest
from edge_prune.runtimes.results import KeptTokens, Timings
from edge_prune.runtimes.preprocess import PREPROCESS_FILE, ImageConfig, preprocess
from edge_prune.runtimes.tokenizer import PromptTokenizer

PTE_FILE = "model.pte"
VISION = "vision_encoder"
EMBED = "token_embedding"
PREFILL = "prefill"
PREFILL_TEXT = "prefill_text"
DECODE = "decode"
# manifest backend -> the name ExecuTorch's backend registry uses
BACKEND_REGISTRY_NAMES = {"xnnpack": "XnnpackBackend", "vulkan": "VulkanBackend", "coreml": "CoreMLBackend",
                          "qnn": "QnnBackend"}
RSS_SAMPLE_S = 0.002
PROGRAM_LAYOUT = 2  # see ProgramSpec.layout


@dataclass
class ProgramSpec:
    """What model.pte promises: static token counts per layer, cache capacities, special tokens, methods.

    seen[i]: visual tokens layer i's attention sees (and its KV cache holds); kept[i]: visual tokens
    after layer i's attention. Text tokens: at most max_prompt_tokens per prompt, and the cache has
    room for max_prompt_tokens + max_new_tokens text tokens per layer.
    """

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_visual_tokens: int
    input_visual_tokens: int
    seen: list[int]
    kept: list[int]
    skip_attention: list[int]
    max_prompt_tokens: int
    max_new_tokens: int
    image_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None
    prefill_segments: list[list[int]]  # [start, end) decoder layers per prefill method
    # PROGRAM_LAYOUT of the converter that wrote it. Layout 2: an image segment ending at an exit candidate
    # hands its visual tokens on before that layer's MLP, and the next image segment runs it first.
    layout: int
    text_only_prefill: bool = True  # the program has prefill_text (prompts without an image)
    exit_layers: list[int] = field(default_factory=list)  # exit-router candidates (a segment ends after each)
    exit_threshold: float | None = None
    # recipe exit.lookahead: the router reads the answer an exit would give, so prefill_exit_<l> runs first and
    # returns (logits, p_exit); the image segment ending at a candidate then returns no probability (but the
    # last segment, whose logits are the exit's answer already)
    exit_lookahead: bool = False
    # recipe exit.frozen: an exit keeps the visual tokens as keys and values. prefill_exit_<l> takes the
    # visual tokens the image segment ending at the candidate handed over (their states before that layer's
    # MLP, which such a segment leaves to the next one): (x_text, x_frozen, pos_frozen[, size_frozen], image_start).
    exit_frozen: bool = False
    # visual KV slots per layer; empty: seen. A frozen exit after layer l leaves kept[l] visual keys in every
    # later layer, so those layers get room for them (text slots start after the visual ones).
    visual_slots: list[int] = field(default_factory=list)
    # Region-balanced ranking over regions x regions cells of the image grid, and merging dropped tokens
    # into kept ones (recipe prune.regions / prune.merge); merged programs hand the visual tokens' sizes
    # from segment to segment and keep per-layer log sizes beside the KV cache.
    regions: int = 1
    merge: bool = False

    @property
    def text_capacity(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens

    @property
    def slots(self) -> list[int]:
        """Visual KV slots of each layer's cache (its text slots follow them)."""
        return list(self.visual_slots) or list(self.seen)

    def visual_lengths(self, exit_layer: int | None) -> list[int]:
        """Visual keys each layer's cache holds after a prefill that exited after `exit_layer` (or did not)."""
        if exit_layer is None:
            return list(self.seen)
        after = self.kept[exit_layer] if self.exit_frozen else 0
        return [s if i <= exit_layer else after for i, s in enumerate(self.seen)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> ProgramSpec:
        layout = layout_of(data) if isinstance(data, dict) else None
        if layout != PROGRAM_LAYOUT:
            raise ArtifactError(f"{source}: the program's method layout is {layout!r}, this runtime runs layout "
                                f"{PROGRAM_LAYOUT}; re-run `edge-prune convert` with this edge-prune")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ArtifactError(
                f"{source}: malformed program description ({exc}); re-run `edge-prune convert`") from exc


def program_layout(artifact: str | Path) -> int:
    """The method layout (`ProgramSpec.layout`) an ExecuTorch artifact was converted with; 1 for artifacts
    from before layouts were numbered. Lets tools tell a stale artifact from a current one unopened."""
    from edge_prune.runtimes.manifest import read_manifest

    return layout_of(read_manifest(Path(artifact), verify=False).extra.get("program") or {})


def layout_of(program: dict[str, Any]) -> int:
    """The method layout of a manifest's program description; 1 where it has none (before numbering)."""
    return int(program.get("layout", 1))


def prefill_method_names(spec: ProgramSpec) -> list[str]:
    """'prefill' for a one-piece decoder, else prefill_0 .. prefill_{k-1} called in turn."""
    if len(spec.prefill_segments) == 1:
        return [PREFILL]
    return [f"{PREFILL}_{k}" for k in range(len(spec.prefill_segments))]


def exit_method_names(spec: ProgramSpec) -> dict[int, str]:
    """Exit layer -> the method that runs the rest of the decoder without visual tokens."""
    return {layer: f"{PREFILL}_exit_{layer}" for layer in spec.exit_layers if layer + 1 < spec.num_layers}


@dataclass
class MethodDelegation:
    delegated_nodes: int
    non_delegated_nodes: int
    delegated_subgraphs: int
    top_non_delegated: dict[str, int] = field(default_factory=dict)  # op -> nodes left to portable kernels

    @property
    def share(self) -> float:
        total = self.delegated_nodes + self.non_delegated_nodes
        return self.delegated_nodes / total if total else 0.0


@dataclass
class DelegationSummary:
    """How much of each method's graph the backend's delegate took (counted on the lowered edge graph)."""

    backend: str
    methods: dict[str, MethodDelegation]

    @property
    def share(self) -> float:
        total = sum(m.delegated_nodes + m.non_delegated_nodes for m in self.methods.values())
        return sum(m.delegated_nodes for m in self.methods.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "share": round(self.share, 4),
                "methods": {k: {**asdict(m), "share": round(m.share, 4)} for k, m in self.methods.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DelegationSummary:
        methods = {k: MethodDelegation(**{f: v[f] for f in ("delegated_nodes", "non_delegated_nodes",
                                                              "delegated_subgraphs", "top_non_delegated")})
                   for k, v in data["methods"].items()}
        return cls(backend=data["backend"], methods=methods)

    def lines(self) -> list[str]:
        out = [f"delegation ({self.backend}): {self.share:.1%} of graph nodes delegated"]
        for name, m in self.methods.items():
            left = ", ".join(f"{op} x{n}" for op, n in list(m.top_non_delegated.items())[:4])
            out.append(f"  {name:16s} {m.share:6.1%}  ({m.delegated_nodes} delegated in "
                       f"{m.delegated_subgraphs} "
                       f"subgraphs, {m.non_delegated_nodes} not{': ' + left if left else ''})")
        return out


# ---- results --------------------------------------------------
@dataclass
class GenerationResult:
    texts: list[str]
    tokens: list[list[int]]
    kept: list[KeptTokens]
    timings: Timings
    first_logits: np.ndarray  # [1, vocab]
    prompt_lengths: list[int]
    peak_rss_mb: float

    @property
    def text(self) -> str:
        return self.texts[0]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens[0], "kept": asdict(self.kept[0]),
                "timings": asdict(self.timings), "peak_rss_mb": self.peak_rss_mb,
                "prompt_length": self.prompt_lengths[0]}


class _PeakRSS:
    """Samples this process's resident memory in a background thread; peak in MiB."""

    def __init__(self, interval_s: float = RSS_SAMPLE_S):
        import psutil

        self.process = psutil.Process()
        self.interval = interval_s
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


class ExecuTorchSession:
    """One loaded artifact. `generate(image, prompt)` runs a single request greedily."""

    def __init__(self, root: Path, manifest: Manifest, spec: ProgramSpec, program: Any, tensor: Any,
                 tokenizer: PromptTokenizer, image_config: ImageConfig):
        self.root = root
        self.manifest = manifest
        self.spec = spec
        self.program = program
        self._torch = tensor
        self.tokenizer = tokenizer
        self.image_config = image_config
        self._methods: dict[str, Any] = {}

    @property
    def threads(self) -> int:
        """The ExecuTorch threadpool's size in this process (shared by every session)."""
        from executorch.extension.pybindings import portable_lib

        return int(portable_lib._threadpool_get_thread_count())

    def method(self, name: str) -> Any:
        if name not in self._methods:
            try:
                self._methods[name] = self.program.load_method(name)
            except Exception as exc:  # the bindings raise RuntimeError with the ExecuTorch error code
                raise ArtifactError(
                    f"{self.root}: cannot load method {name!r} of {PTE_FILE} ({exc})") from exc
        return self._methods[name]

    def _run(self, name: str, *inputs: np.ndarray) -> list[np.ndarray]:
        outs = self.method(name).execute([self._torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
        return [o.numpy() for o in outs]

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32,
                 ignore_eos: bool = False) -> GenerationResult:
        """Greedy answer to one prompt about one image (None: a text-only prompt, never pruned).

        `ignore_eos` keeps decoding past end-of-sequence, for decode-speed measurements.
        """
        spec = self.spec
        if max_new_tokens < 1 or max_new_tokens > spec.max_new_tokens:
            raise InputError(
                f"max_new_tokens is {max_new_tokens}; this artifact's KV cache has room for 1 to "
                f"{spec.max_new_tokens} (re-convert with a larger --max-new-tokens)"
            )
        with _PeakRSS() as rss:
            t0 = time.perf_counter()
            with_image = image is not None
            tp = self.tokenizer.encode(prompt, with_image)
            n_text = len(tp.text_ids)
            if not 2 <= n_text <= spec.max_prompt_tokens:
                raise InputError(
                    f"the prompt has {n_text} text tokens; this artifact takes 2 to {spec.max_prompt_tokens} "
                    "(re-convert with a larger --max-prompt-tokens)"
                )
            if with_image and tp.text_after_image < 1:
                raise InputError("the prompt ends with the image; the exported prefill needs text after it "
                                 "(the chat template's assistant prefix normally provides it)")
            pixels = preprocess(image, self.image_config) if with_image else None
            t1 = time.perf_counter()
            features = self._run(VISION, pixels)[0] if with_image else None
            t2 = time.perf_counter()
            embeds = self._run(EMBED, np.asarray([tp.text_ids], dtype=np.int64))[0]
            exit_layer = None
            if with_image:
                logits, exit_layer = self._prefill(embeds, features, tp.image_start)  # type: ignore[arg-type]
            elif spec.text_only_prefill:
                logits = self._run(PREFILL_TEXT, embeds)[0]
            else:
                raise InputError("this artifact was converted without the text-only prefill; pass an image, "
                                 "or "
                                 "re-convert without disabling it")
            t3 = time.perf_counter()
            token = int(np.argmax(logits[0]))
            t4 = time.perf_counter()
            out = [token]
            n_in = spec.input_visual_tokens if with_image else 0
            position = n_text + n_in
            text_len = n_text
            # layers after an exit saw no visual tokens (or, frozen, the ones present at it); the exit layer did
            seen = spec.visual_lengths(exit_layer) if with_image else [0] * spec.num_layers
            visual_len = np.asarray(seen, dtype=np.int64)
            eos = set() if ignore_eos else set(spec.eos_token_ids)
            while token not in eos and len(out) < max_new_tokens:
                step = self._run(DECODE, np.asarray([[token]], dtype=np.int64),
                                 np.asarray([position], dtype=np.int64),
                                 np.asarray([text_len], dtype=np.int64), visual_len)[0]
                position += 1
                text_len += 1
                token = int(np.argmax(step[0]))
                out.append(token)
            t5 = time.perf_counter()
        steps = len(out) - 1
        timings = Timings(
            vision_ms=(t2 - t1) * 1000, prefill_ms=(t3 - t2) * 1000, ttft_ms=(t4 - t0) * 1000,
            decode_tok_s=steps / (t5 - t4) if steps and t5 > t4 else 0.0, preprocess_ms=(t1 - t0) * 1000,
        )
        n = spec.num_visual_tokens if with_image else 0
        per_layer = list(spec.kept) if with_image else [0] * spec.num_layers
        if exit_layer is not None:
            per_layer = [c if i < exit_layer else 0 for i, c in enumerate(per_layer)]
        kept = KeptTokens(visual_tokens=n, entered_decoder=n_in, per_layer=per_layer, exit_layer=exit_layer)
        return GenerationResult(
            texts=[self.tokenizer.decode(out)], tokens=[out], kept=[kept], timings=timings,
            first_logits=logits, prompt_lengths=[n_text + n], peak_rss_mb=rss.peak_mb,
        )

    def _prefill(self, embeds: np.ndarray, features: np.ndarray,
                 image_start: int) -> tuple[np.ndarray, int | None]:
        """Run the prefill segments in turn; after an exit-candidate layer, follow the router's decision.

        Returns (logits, exit layer or None). A segment hands (x_text, x_vis, pos_vis) to the next;
        one that ends at a candidate layer also returns p(exit). On an exit the rest of the decoder
        runs text-only (prefill_exit_<layer>), so later layers never see, nor cache, visual tokens.
        A lookahead router's p(exit) comes from prefill_exit_<layer> itself, with the answer it would
        give; when the request stays, the next segment rewrites the text KV entries that run wrote.
        With frozen exits prefill_exit_<layer> takes the visual tokens the segment handed over (before
        the layer's MLP, which the next segment runs if the request stays) and writes their keys and values
        into the later layers' caches.
        """
        spec = self.spec
        start = np.asarray([image_start], dtype=np.int64)
        exits = exit_method_names(spec)
        state = list(self._run(prefill_method_names(spec)[0], embeds, features, start))
        for k, (_, end) in enumerate(spec.prefill_segments):
            layer = end - 1
            if layer in spec.exit_layers:
                p_exit = None if spec.exit_lookahead and layer in exits else float(state.pop()[0])
                # (x_vis, pos_vis[, size_vis]): what prefill_exit_<layer> freezes
                frozen = state[1:] if spec.exit_frozen and layer in exits else []
                if spec.kept[layer] > 0:
                    if p_exit is None:  # lookahead: the exit's own run gives the probability
                        logits, p_run = self._run(exits[layer], state[0], *frozen, start)
                        if router_exits(float(p_run[0]), spec.exit_threshold or 0.0):
                            return logits, layer
                    elif router_exits(p_exit, spec.exit_threshold or 0.0):
                        if layer in exits:
                            return self._run(exits[layer], state[0], *frozen, start)[0], layer
                        return state[0], layer
            if k + 1 < len(spec.prefill_segments):
                state = list(self._run(prefill_method_names(spec)[k + 1], *state, start))
        return state[0], None


def _load_program(pte: Path, backend: str) -> tuple[Any, Any]:
    """Load the .pte with the ExecuTorch runtime; names what is missing when it cannot."""
    try:
        from executorch.runtime import Runtime, Verification
    except ImportError as exc:
        raise ArtifactError(
            f"the ExecuTorch runtime is not installed here ({exc}); `pip install executorch` on this device"
        ) from exc
    import torch  # the pip runtime's bindings exchange torch tensors (see the module docstring)

    runtime = Runtime.get()
    needed = BACKEND_REGISTRY_NAMES.get(backend)
    if needed is None or not runtime.backend_registry.is_available(needed):
        have = ", ".join(runtime.backend_registry.registered_backend_names) or "none"
        raise ArtifactError(
            f"this artifact was lowered for {backend!r} ({needed}), which this ExecuTorch runtime lacks "
            f"(it has: {have}); run it on a device whose ExecuTorch build includes {needed} "
            "(e.g. the Android AAR / iOS framework with that backend), or re-convert with --backend xnnpack"
        )
    try:
        program = runtime.load_program(pte, verification=Verification.InternalConsistency)
    except Exception as exc:  # RuntimeError from the bindings: truncated or corrupt flatbuffer
        raise ArtifactError(
            f"{pte}: ExecuTorch cannot load this program ({exc}); the file is corrupt or truncated, or was "
            "written by an incompatible ExecuTorch version: re-run `edge-prune convert`"
        ) from exc
    return program, torch


def set_threads(threads: int) -> int:
    """Size ExecuTorch's CPU threadpool (XNNPACK's and the portable kernels') and return the size it took.

    The pool is one per process, as in the C++ runtime: every session in this process runs on it, so
    set it before generating, not while another thread is inside a method."""
    check_threads(threads)
    from executorch.extension.pybindings import portable_lib

    reset = getattr(portable_lib, "_unsafe_reset_threadpool", None)
    count = getattr(portable_lib, "_threadpool_get_thread_count", None)
    if reset is None or count is None:
        raise ArtifactError("this ExecuTorch runtime cannot resize its threadpool from Python; drop the threads "
                            "option (it then uses one thread per performance core)")
    if count() != threads:
        reset(threads)
    return int(count())


def open_session(path: Path, manifest: Manifest, threads: int | None = None, **options: Any) -> ExecuTorchSession:
    """Called by edge_prune.runtimes.load() after the manifest's checksums were verified.

    `threads` (load() has checked it before anything was read): resize the process's ExecuTorch
    threadpool (see `set_threads`); None leaves it as it is."""
    if options:
        raise InputError(f"unknown session options {sorted(options)}; the ExecuTorch runtime takes threads only")
    root = Path(path)
    spec = ProgramSpec.from_dict(manifest.extra.get("program"), source=str(root / "manifest.json"))
    pte = root / PTE_FILE
    if PTE_FILE not in manifest.files:
        raise ArtifactError(f"{root}: the manifest lists no {PTE_FILE}; this is not an ExecuTorch artifact")
    program, torch_module = _load_program(pte, manifest.backend)
    if threads is not None:
        set_threads(threads)
    expected = {VISION, EMBED, DECODE, *prefill_method_names(spec), *exit_method_names(spec).values()}
    expected |= {PREFILL_TEXT} if spec.text_only_prefill else set()
    missing = sorted(expected - set(program.method_names))
    if missing:
        raise ArtifactError(f"{pte}: methods {missing} are missing; the manifest and the program disagree "
                            "(re-run `edge-prune convert`)")
    tokenizer = PromptTokenizer.load(root, spec.image_token_id)
    image_config = ImageConfig.load(root / PREPROCESS_FILE)
    return ExecuTorchSession(root, manifest, spec, program, torch_module, tokenizer, image_config)
