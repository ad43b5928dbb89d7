"""BPD heads end to end on the tiny random Llama: training, artifacts, engine and server.

- `train_bpd` lowers the held-out loss and raises head accuracy, deterministically, and writes an
  artifact the engine loads;
- an artifact of another model, or none at all, fails loudly (engine and `specd serve`);
- over HTTP, per-request `speculative.method = "bpd"` is served and equals `none` (greedy).
The real-model lossless tests are in test_spec_lossless.py, the sampling law in test_spec_sampling.py.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from engine.config import CacheConfig, EngineConfig
from engine.train.artifact import ArtifactError, read_header, save_artifact, weight_fingerprint
from engine.train.config import TrainConfig
from engine.types import EngineRequest, SamplingParams, SpecParams
from tests.conftest import make_tiny_model


def random_heads_artifact(model_dir: Path, out: Path, num_heads: int = 2, hidden: int = 64) -> Path:
    """Random (seeded) heads: any heads are lossless, and these draft differently from the model."""
    g = torch.Generator().manual_seed(0)
    return save_artifact(out, {"weight": torch.randn(num_heads, hidden, hidden, generator=g) / hidden ** 0.5,
                               "bias": torch.randn(num_heads, hidden, generator=g)},
                         method="bpd", base_model="tiny", base_model_hash=weight_fingerprint(model_dir), num_heads=num_heads)


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    return random_heads_artifact(tiny_model_dir, tmp_path_factory.mktemp("bpd") / "tiny.safetensors")


def _fit(model_dir, data, seed=0, epochs=4):
    """Train heads on the records and evaluate them on the same records (the loss it optimises)."""
    from engine.train.bpd import BpdObjective, init_heads, record_features
    from engine.train.data import read_records
    from engine.train.frozen import FrozenLlama
    from engine.train.trainer import train

    _, records = read_records(data)
    frozen = FrozenLlama(model_dir)
    examples = [record_features(frozen, r, 2) for r in records]
    params = list(init_heads(2, frozen.hidden_size))
    config = TrainConfig(steps=epochs * len(examples), lr=3e-3, warmup_steps=2, eval_every=1000, seed=seed)
    result = train(params, BpdObjective(frozen), examples, examples, config, progress=False)
    return params, result


def test_training_lowers_the_loss_deterministically(calm_model_dir, tiny_data):
    params, result = _fit(calm_model_dir, tiny_data)
    before, after = result.evals[0], result.evals[-1]
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    again, _ = _fit(calm_model_dir, tiny_data)
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    other, _ = _fit(calm_model_dir, tiny_data, seed=1, epochs=1)
    first, _ = _fit(calm_model_dir, tiny_data, epochs=1)
    assert not torch.equal(first[0], other[0])  # the seed picks the epoch order


def test_train_bpd_writes_an_artifact_the_engine_serves(calm_model_dir, tiny_data, tmp_path):
    from engine.engine import LLMEngine
    from engine.train.bpd import train_bpd

    out = tmp_path / "heads.safetensors"
    header = train_bpd(str(calm_model_dir), tiny_data, out, num_heads=2, epochs=1,
                       config=TrainConfig(lr=3e-3, warmup_steps=2), command="test", progress=False)
    assert header["method"] == "bpd" and header["num_heads"] == 2 and header["command"] == "test"
    assert header["eval"]["untrained"]["step"] == 0 and header["eval"]["trained"]["step"] > 0
    assert read_header(out)["base_model_hash"] == weight_fingerprint(calm_model_dir)
    engine = LLMEngine(EngineConfig(model=str(calm_model_dir), spec="bpd", bpd_artifact=str(out),
                                    cache=CacheConfig(num_tokens=2048)))
    assert engine.spec.num_heads == 2


def test_engine_refuses_a_wrong_or_missing_artifact(tiny_model_dir, tmp_path_factory, tiny_artifact):
    from engine.engine import LLMEngine

    other = make_tiny_model(tmp_path_factory.mktemp("other"), tiny_model_dir, seed=5)
    cache = CacheConfig(num_tokens=1024)
    with pytest.raises(ArtifactError, match="trained for base model 'tiny'"):
        LLMEngine(EngineConfig(model=str(other), spec="bpd", bpd_artifact=str(tiny_artifact), cache=cache))
    with pytest.raises(ValueError, match="--spec bpd needs a trained artifact"):
        LLMEngine(EngineConfig(model=str(other), spec="bpd", cache=cache))
    engine = LLMEngine(EngineConfig(model=str(other), spec="none", cache=cache))
    with pytest.raises(ValueError, match="no bpd artifact is loaded"):
        engine.add_request(EngineRequest("x", [1, 2], SamplingParams(), SpecParams(method="bpd")))
    with pytest.raises(ValueError, match="--spec bpd is not available with --spec-layout padded"):
        EngineConfig(spec="bpd", spec_layout="padded")


def test_serve_fails_at_start_on_another_models_artifact(start_server, tiny_model_dir, tmp_path_factory, tiny_artifact):
    other = make_tiny_model(tmp_path_factory.mktemp("other-serve"), tiny_model_dir, seed=6)
    with pytest.raises(RuntimeError, match="trained for base model"):
        start_server("--spec", "bpd", "--bpd-artifact", str(tiny_artifact), model_dir=other)


def test_bpd_over_http_equals_none(start_server, tiny_artifact):
    server = start_server("--bpd-artifact", str(tiny_artifact), "--no-spec-adaptive")
    outs = {}
    for method in ("none", "bpd"):
        body = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                "speculative": {"method": method}}
        resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        outs[method] = resp.json()
    assert outs["bpd"]["choices"][0]["text"] == outs["none"]["choices"][0]["text"]
    spec = outs["bpd"]["usage"]["speculative"]
    assert spec["draft_tokens"] > 0, spec
