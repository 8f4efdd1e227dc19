"""The device-side package must import without torch or transformers installed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_prune.errors import ArtifactError
from edge_prune.runtimes import load, read_manifest
from edge_prune.runtimes.manifest import Manifest, sha256_file

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'torchao'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import edge_prune.runtimes, edge_prune.runtimes.manifest
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), sorted(sys.modules)
print('ok')
"""


def test_runtimes_import_without_torch_or_transformers():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _artifact(tmp_path, backend="xnnpack"):
    (tmp_path / "model.bin").write_bytes(b"weights" * 100)
    m = Manifest(backend=backend, quant="none", files={"model.bin": sha256_file(tmp_path / "model.bin")})
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_dict()))
    return tmp_path


def test_manifest_checksums_are_verified(tmp_path):
    art = _artifact(tmp_path)
    assert read_manifest(art).files["model.bin"]
    (art / "model.bin").write_bytes(b"weights" * 50)  # truncated copy
    with pytest.raises(ArtifactError, match="does not match its manifest checksum"):
        read_manifest(art)
    (art / "model.bin").unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        read_manifest(art)


def test_directory_without_manifest_is_rejected(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        load(tmp_path / "nope")


def test_unknown_backend_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="backend 'tpu9' is unknown"):
        load(_artifact(tmp_path, backend="tpu9"))


def test_llamacpp_runtime_imports_without_torch_or_transformers():
    pytest.importorskip("llama_cpp")
    script = BLOCKER.replace(
        "import edge_prune.runtimes, edge_prune.runtimes.manifest",
        "import edge_prune.runtimes, edge_prune.runtimes.llamacpp, edge_prune.runtimes.llamacpp_keys",
    )
    assert "edge_prune.runtimes.llamacpp," in script
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_executorch_runtime_imports_without_torch_or_transformers():
    """Importing the runtime needs no torch; only opening a session loads the executorch bindings."""
    script = BLOCKER.replace(
        "import edge_prune.runtimes, edge_prune.runtimes.manifest",
        "import edge_prune.runtimes, edge_prune.runtimes.executorch, edge_prune.runtimes.preprocess, "
        "edge_prune.runtimes.tokenizer",
    )
    assert "edge_prune.runtimes.executorch," in script
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
