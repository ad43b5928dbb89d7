"""What the artifact-backed drafters (`pass`, `bpd`, `recycle`) share end to end on the tiny random Llama: an
artifact of another model, or none at all, fails loudly in the engine and at `specd serve` start-up,
and over HTTP a request choosing the method is served and equals `none` (greedy)."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from engine.config import CacheConfig, EngineConfig
from engine.train.artifact import ArtifactError, save_artifact, weight_fingerprint
from engine.types import EngineRequest, SamplingParams, SpecParams
from tests.conftest import make_tiny_model
from tests.e2e.conftest import random_heads_artifact, random_recycle_artifact


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Random (seeded) weights for the tiny model: any are lossless, and these draft something."""
    out = tmp_path_factory.mktemp("artifacts")
    embeds = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    return {"pass": save_artifact(out / "pass.safetensors", {"lookahead": embeds}, method="pass", base_model="tiny",
                                  base_model_hash=weight_fingerprint(tiny_model_dir)),
            "bpd": random_heads_artifact(tiny_model_dir, out / "bpd.safetensors"),
            "recycle": random_recycle_artifact(tiny_model_dir, out / "recycle.safetensors", list(range(0, 4096, 3)))}


def _flags(method: str, artifact: Path) -> dict:
    return {f"{method}_artifact": str(artifact)}


@pytest.mark.parametrize("method", ["pass", "bpd", "recycle"])
def test_engine_refuses_a_wrong_or_missing_artifact(tiny_model_dir, tmp_path_factory, tiny_artifacts, method):
    from engine.engine import LLMEngine

    other = make_tiny_model(tmp_path_factory.mktemp("other"), tiny_model_dir, seed=5)
    cache = CacheConfig(num_tokens=1024)
    with pytest.raises(ArtifactError, match="trained for base model 'tiny'"):
        LLMEngine(EngineConfig(model=str(other), spec=method, cache=cache, **_flags(method, tiny_artifacts[method])))
    with pytest.raises(ValueError, match=f"--spec {method} needs a trained artifact"):
        LLMEngine(EngineConfig(model=str(other), spec=method, cache=cache))
    engine = LLMEngine(EngineConfig(model=str(other), spec="none", cache=cache))
    with pytest.raises(ValueError, match=f"no {method} artifact is loaded"):
        engine.add_request(EngineRequest("x", [1, 2], SamplingParams(), SpecParams(method=method)))
    with pytest.raises(ValueError, match=f"--spec {method} is not available with --spec-layout padded"):
        EngineConfig(spec=method, spec_layout="padded")


@pytest.mark.parametrize("method", ["pass", "bpd", "recycle"])
def test_serve_fails_at_start_on_another_models_artifact(start_server, tiny_model_dir, tmp_path_factory,
                                                        tiny_artifacts, method):
    other = make_tiny_model(tmp_path_factory.mktemp("other-serve"), tiny_model_dir, seed=6)
    with pytest.raises(RuntimeError, match="trained for base model"):
        start_server("--spec", method, f"--{method}-artifact", str(tiny_artifacts[method]), model_dir=other)


@pytest.mark.parametrize("method,flags", [
    ("pass", ["--pass-mode", "fused", "--pass-lookahead", "3"]),
    ("pass", ["--pass-mode", "two_call", "--pass-lookahead", "3"]),
    ("pass", ["--pass-mode", "branch", "--pass-lookahead", "3"]),  # look-ahead rows beside the drafts
    ("pass", ["--pass-lookahead", "3", "--refine-weight", "0"]),  # the look-ahead rows' own drafts
    ("bpd", []),
    ("bpd", ["--refine-paths", "2"]),  # refined drafts as a tree (2 best lattice paths)
    ("bpd", ["--refine-weight", "0"]),  # the heads' own drafts
    ("recycle", []),
    ("recycle", ["--num-draft-tokens", "1"]),
])
def test_method_over_http_equals_none(start_server, tiny_artifacts, method, flags):
    server = start_server(f"--{method}-artifact", str(tiny_artifacts[method]), *flags, "--no-spec-adaptive")
    outs = {}
    for chosen in ("none", method):
        body = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                "speculative": {"method": chosen}}
        resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        outs[chosen] = resp.json()
    assert outs[method]["choices"][0]["text"] == outs["none"]["choices"][0]["text"]
    spec = outs[method]["usage"]["speculative"]
    assert spec["draft_tokens"] > 0, spec
