"""Trained drafter artifacts: a small safetensors file plus a JSON header in its metadata.

The header (metadata key "specd") names the method, the base model and its *weight fingerprint*.
A drafter trained for one model is meaningless on another (PaSS embeddings live in the model's own
embedding space), so loading checks the fingerprint and fails with a clear error on a mismatch.

Fingerprint: sha256 over every tensor of the model directory's *.safetensors, in name order: its
name, dtype, shape and the values of its first and last two rows (1-D tensors: all of them). It reads
a few KiB through safetensors' lazy slices, so checking costs milliseconds even for large models,
and any retraining, fine-tune or different seed changes it (every matrix's edge rows change).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "artifacts"
FORMAT_VERSION = 1
METADATA_KEY = "specd"
EDGE_ROWS = 2


class ArtifactError(ValueError):
    """An artifact that cannot serve this model or method; the message says why and what to do."""


def default_artifact_path(method: str, model: str) -> Path:
    """Where the committed artifact of `method` for `model` lives: artifacts/<method>/<model name>.safetensors."""
    from engine.models.loader import model_name

    return ARTIFACTS_DIR / method / f"{model_name(model)}.safetensors"


def weight_fingerprint(model_dir: str | Path) -> str:
    """'sha256:<hex>' of the model's weights (see the module docstring)."""
    import contextlib

    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        slices = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            slices.update({name: handle.get_slice(name) for name in handle.keys()})
        for name in sorted(slices):
            sl = slices[name]
            shape = list(sl.get_shape())
            digest.update(f"{name}|{sl.get_dtype()}|{shape}".encode())
            rows = shape[0] if shape else 0
            parts = [sl[:]] if len(shape) <= 1 or rows <= 2 * EDGE_ROWS else [sl[:EDGE_ROWS], sl[rows - EDGE_ROWS:]]
            for part in parts:
                digest.update(part.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass
class Artifact:
    """A loaded artifact: its tensors (on the CPU, as stored) and its header."""

    tensors: dict
    header: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.header["method"]


def save_artifact(path: str | Path, tensors: dict, *, method: str, base_model: str, base_model_hash: str,
                  **extra) -> Path:
    """Write tensors + header; `extra` (JSON-serialisable) goes into the header as is."""
    from safetensors.torch import save_file

    header = {"format_version": FORMAT_VERSION, "method": method, "base_model": base_model,
              "base_model_hash": base_model_hash, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    tmp.replace(path)  # a crash mid-write never leaves a truncated artifact behind
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header alone (no tensors loaded); ArtifactError if it is not a specd artifact."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is not a safetensors file: {exc}") from exc
    if METADATA_KEY not in metadata:
        raise ArtifactError(f"{path} has no specd header: it was not written by `specd train`")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: the specd header is not valid JSON ({exc})") from exc
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {header.get('format_version')!r}, this specd reads "
                            f"{FORMAT_VERSION}")
    return header


def load_artifact(path: str | Path, method: str, model_dir: str | Path | None = None,
                  fingerprint: str | None = None) -> Artifact:
    """Load an artifact made for `method` and for the model in `model_dir` (or with `fingerprint`).

    Raises ArtifactError when the file is not an artifact, is for another method, or was trained
    on another base model.
    """
    from safetensors.torch import load_file

    header = read_header(path)
    if header.get("method") != method:
        raise ArtifactError(f"artifact {path} is for method {header.get('method')!r}, not {method!r}")
    if fingerprint is None and model_dir is not None:
        fingerprint = weight_fingerprint(model_dir)
    if fingerprint is not None and header.get("base_model_hash") != fingerprint:
        raise ArtifactError(
            f"artifact {path} was trained for base model {header.get('base_model')!r} (weights "
            f"{header.get('base_model_hash')}), but the served model's weights are {fingerprint}; "
            f"train one for this model: specd train data --model MODEL && specd train {method} --model MODEL")
    return Artifact(load_file(str(path)), header)


def load_served_artifact(named: str | None, method: str, model: str, model_dir: str | Path) -> Artifact | None:
    """The artifact a server was given (it must load), or else the committed one for this model
    (None when there is none). Raises ArtifactError as load_artifact does."""
    path = Path(named) if named else default_artifact_path(method, model)
    if not named and not path.is_file():
        return None
    return load_artifact(path, method, model_dir=model_dir)
