"""Atomic artifact-directory writer shared by every converter (ExecuTorch and GGUF).

Files are written into a hidden temp directory beside the target; `commit()` hashes every
file into manifest.json and renames the directory into place, so an interrupted convert
never leaves a half artifact where a runtime could pick it up.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edge_prune.errors import ArtifactError
from edge_prune.runtimes.manifest import MANIFEST_FILE, Manifest, sha256_file


class ArtifactWriter:
    """Collects an artifact's files in a temp dir; `commit()` writes the manifest and swaps it into place.

        with ArtifactWriter("out/", overwrite=True) as art:
            art.write_bytes("model.pte", data)
            art.write_json("recipe.json", recipe.to_dict())
            art.commit(backend="xnnpack", quant="none", versions={...})
    """

    def __init__(self, target: str | os.PathLike[str], overwrite: bool = False):
        self.target = Path(target)
        # An empty directory counts as new: users often `mkdir` the output first.
        empty_dir = self.target.is_dir() and not any(self.target.iterdir())
        if self.target.exists() and not empty_dir:
            if not (self.target / MANIFEST_FILE).is_file():
                # Checked first, so --overwrite is never suggested for what it would refuse to replace
                # (a typo could otherwise wipe a checkpoint).
                raise ArtifactError(
                    f"{self.target} exists and is not an edge-prune artifact (no {MANIFEST_FILE}); "
                    "choose an empty or new -o directory"
                )
            if not overwrite:
                raise ArtifactError(
                    f"{self.target} already exists; choose another -o directory or pass --overwrite"
                )
        self.overwrite = overwrite
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.",
                                        suffix=".tmp"))
        self.committed = False

    # ---- adding files ----------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        """Where a file named `rel` goes inside the artifact (parent folders are created)."""
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or rel == MANIFEST_FILE:
            raise ArtifactError(f"artifact file name {rel!r} must be a relative path inside the artifact")
        out = self.tmp / rel_path
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def write_bytes(self, rel: str, data: bytes) -> Path:
        out = self.path(rel)
        out.write_bytes(data)
        return out

    def write_text(self, rel: str, text: str) -> Path:
        out = self.path(rel)
        out.write_text(text)
        return out

    def write_json(self, rel: str, data: Any) -> Path:
        return self.write_text(rel, json.dumps(data, indent=2) + "\n")

    def copy_file(self, rel: str, source: str | os.PathLike[str]) -> Path:
        out = self.path(rel)
        shutil.copyfile(source, out)
        return out

    # ---- finishing ---------------------------------------------------------------------------
    def commit(self, backend: str, quant: str, versions: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None) -> Manifest:
        """Hash every file, write manifest.json, and rename the directory into place."""
        files = {
            str(p.relative_to(self.tmp)): sha256_file(p)
            for p in sorted(self.tmp.rglob("*")) if p.is_file()
        }
        manifest = Manifest(backend=backend, quant=quant, files=files, versions=dict(versions or {}),
                            extra=dict(extra or {}))
        (self.tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()


def describe(root: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """What `edge-prune inspect ARTIFACT/` shows: the manifest, plus the delegation summary if any."""
    from edge_prune.runtimes.manifest import read_manifest

    root = Path(root)
    manifest = read_manifest(root)
    sizes = {rel: (root / rel).stat().st_size for rel in manifest.files}
    info: dict[str, Any] = {"path": str(root), **manifest.to_dict(), "bytes": sizes}
    lines = [f"{root}: {manifest.backend} artifact, quant {manifest.quant}, "
             f"{sum(sizes.values()) / 2**20:.2f} MiB in {len(sizes)} files (checksums verified)"]
    for rel, size in sizes.items():
        lines.append(f"  {rel:24s} {size / 2**20:8.2f} MiB")
    program = manifest.extra.get("program")
    if isinstance(program, dict) and "kept" in program:
        lines.append(f"  visual tokens per layer (attention saw -> kept): "
                     f"{program['num_visual_tokens']} -> {program['kept']}; text up to "
                     f"{program['max_prompt_tokens']} prompt + {program['max_new_tokens']} new tokens")
    delegation = manifest.extra.get("delegation")
    if isinstance(delegation, dict) and "methods" in delegation:
        from edge_prune.runtimes.executorch import DelegationSummary

        lines += ["  " + line for line in DelegationSummary.from_dict(delegation).lines()]
    versions = ", ".join(f"{k} {v}" for k, v in manifest.versions.items())
    if versions:
        lines.append(f"  made with {versions}")
    return info, lines
