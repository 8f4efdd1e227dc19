"""On-device runtimes. Importable with only numpy, psutil, a tokenizer library and the backend's runtime.

    from edge_prune.runtimes import load
    session = load("artifact/")   # verifies the manifest's checksums
"""

from __future__ import annotations

from pathlib import Path

from edge_prune.errors import ArtifactError
from edge_prune.runtimes.manifest import Manifest, read_manifest

# backend name in the manifest -> runtime module (inside this package) that runs it
RUNTIME_MODULES = {
    "xnnpack": "executorch", "vulkan": "executorch", "coreml": "executorch", "qnn": "executorch",
    "llamacpp": "llamacpp",
}


def load(artifact_dir: str | Path, **options):
    """Open an artifact directory with the runtime its manifest names."""
    import importlib

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
