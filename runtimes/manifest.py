"""The artifact manifest: the one thing converters and runtimes share (no torch needed here).

An artifact directory holds manifest.json (format, version, backend, quant, tool versions,
sha256 of every file), recipe.json, the source checkpoint's config.json, the model files and the
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_prune.errors import ArtifactError

MANIFEST_FILE = "manifest.json"
# The source checkpoint's config, copied in so `edge-prune profile ARTIFACT` can predict too.
CONFIG_FILE = "config.json"
ARTIFACT_FORMAT = "edge-prune-artifact"
ARTIFACT_VERSION = 1


@dataclass
class Manifest:
    backend: str
    quant: str
    files: dict[str, str]  # relative path -> sha256
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (e.g. delegation summary)
    format: str = ARTIFACT_FORMAT
    version: int = ARTIFACT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "backend": self.backend, "quant": self.quant,
                "files": dict(self.files), "versions": dict(self.versions), "extra": dict(self.extra)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(artifact_dir: str | Path, verify: bool = True) -> Manifest:
    """Read manifest.json and (by default) check every listed file's sha256."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory not found: {root}")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST_FILE}; it is not an edge-prune artifact (create one with `edge-prune convert`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); re-run `edge-prune convert`") from exc
    if not isinstance(data, dict) or data.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: field 'format' is not {ARTIFACT_FORMAT!r}")
    if data.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path}: field 'version' is {data.get('version')!r}, this edge-prune reads {ARTIFACT_VERSION}")
    try:
        manifest = Manifest(backend=data["backend"], quant=data["quant"], files=dict(data["files"]),
                            versions=dict(data.get("versions") or {}), extra=dict(data.get("extra") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: missing or malformed field {exc}") from exc
    if verify:
        for rel, expected in manifest.files.items():
            file = root / rel
            if not file.is_file():
                raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing; copy the whole artifact directory")
            actual = sha256_file(file)
            if actual != expected:
                raise ArtifactError(
                    f"{root}: {rel} does not match its manifest checksum (corrupt or truncated copy?); "
                    "copy the artifact again or re-run `edge-prune convert`"
                )
    return manifest
