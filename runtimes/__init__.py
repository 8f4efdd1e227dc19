"""On-device runtimes. Importable with only numpy, psutil, a tokenizer library and the backend's runtime.

    from edge_prune.runtimes import load
    session = load("artifact/")   # verifies the manifest's checksums
    session = load("artifact/", threads=4)   # CPU threads (every runtime takes this option)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_prune.errors import ArtifactError, InputError
from edge_prune.runtimes.manifest import Manifest, read_manifest

# backend name in the manifest -> runtime module (inside this package) that runs it
RUNTIME_MODULES = {
    "xnnpack": "executorch", "vulkan": "executorch", "coreml": "executorch", "qnn": "executorch",
    "llamacpp": "llamacpp",
}
MAX_THREADS = 256


def check_threads(threads: Any) -> int:
    """`threads` as given, or InputError when it is not a usable CPU thread count."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InputError(f"threads is {threads!r}; expected a whole number from 1 to {MAX_THREADS} (CPU threads "
                         "for the runtime, usually the device's big cores)")
    return threads


def load(artifact_dir: str | Path, **options):
    """Open an artifact directory with the runtime its manifest names.

    Every runtime takes `threads` (CPU threads; default: the runtime's own choice); the others are
    the runtime's own (e.g. llama.cpp's `n_ctx`)."""
    import importlib

    if options.get("threads") is not None:
        check_threads(options["threads"])

    manifest = read_manifest(artifact_dir)
    module_name = RUNTIME_MODULES.get(manifest.backend)
    if module_name is None:
        raise ArtifactError(
            f"{artifact_dir}: backend {manifest.backend!r} is unknown; known backends: {', '.join(RUNTIME_MODULES)}"
        )
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        raise ArtifactError(
            f"{artifact_dir}: backend {manifest.backend!r} needs the {module_name} runtime, which is not "
            f"available here ({exc}); install edge-prune's {module_name} extra on this device"
        ) from exc
    return module.open_session(Path(artifact_dir), manifest, **options)


__all__ = ["load", "read_manifest", "Manifest"]
