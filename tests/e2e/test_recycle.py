"""The recycle drafter end to end on the tiny random Llama: training, artifacts and --recycle-lossy.

- training lowers the loss it optimises, deterministically under its seed;
- `train_recycle` writes an artifact (with its provenance and draft vocabulary) that the engine serves;
- --recycle-lossy keeps one module token per step unverified: every draft counts as accepted, and the
  output (no longer the model's own) still ends exactly at max_tokens.
Wrong or missing artifacts and lossless HTTP serving: test_trained_artifacts.py. The real-model lossless
tests are in test_spec_lossless.py, the sampling law in test_spec_sampling.py.
"""
from __future__ import annotations

import httpx
import torch

from engine.config import CacheConfig, EngineConfig
from engine.train.config import TrainConfig
from tests.e2e.conftest import check_trained_artifact, random_recycle_artifact


def _fit(model_dir, data, seed=0, epochs=3):
    """Train a module on the records and evaluate it on the same records (the loss it optimises)."""
    from engine.train.data import read_records
    from engine.train.frozen import FrozenLlama
    from engine.train.recycle import RecycleObjective, build_examples, init_module
    from engine.train.trainer import train

    _, records = read_records(data)
    frozen = FrozenLlama(model_dir)
    examples, _, vocab = build_examples(frozen, records, [], vocab_size=512, depth=2)
    params = init_module(frozen.hidden_size, 32, torch.Generator().manual_seed(seed))
    config = TrainConfig(steps=epochs * len(examples), lr=3e-3, warmup_steps=2, eval_every=1000, seed=seed)
    result = train(params, RecycleObjective(frozen, frozen.model.lm_head[vocab]), examples, examples, config,
                   progress=False)
    return params, result


def test_training_lowers_the_loss_deterministically(calm_model_dir, tiny_data):
    params, result = _fit(calm_model_dir, tiny_data)
    before, after = result.evals[0], result.evals[-1]
    assert after["loss"] < before["loss"] - 0.5, (before, after)
    assert after["accepted_per_step"] > before["accepted_per_step"], (before, after)
    again, _ = _fit(calm_model_dir, tiny_data)
    assert all(torch.equal(a, b) for a, b in zip(params, again))
    other, _ = _fit(calm_model_dir, tiny_data, seed=1, epochs=1)
    first, _ = _fit(calm_model_dir, tiny_data, epochs=1)
    assert not torch.equal(first[4], other[4])  # the seed picks the initialisation and the epoch order


def test_train_recycle_writes_an_artifact_the_engine_serves(calm_model_dir, tiny_data, tmp_path):
    from engine.engine import LLMEngine
    from engine.train.recycle import train_recycle

    out = tmp_path / "module.safetensors"
    header = train_recycle(str(calm_model_dir), tiny_data, out, depth=2, vocab_size=300, ffn_size=32, epochs=1,
                           config=TrainConfig(lr=3e-3, warmup_steps=2), command="test", progress=False)
    check_trained_artifact(header, out, "recycle", calm_model_dir, vocab_size=300, depth=2)
    engine = LLMEngine(EngineConfig(model=str(calm_model_dir), spec="recycle", recycle_artifact=str(out),
                                    cache=CacheConfig(num_tokens=2048)))
    proposer = engine.spec.proposers["recycle"]
    assert len(proposer.module.vocab) == 300 and proposer.max_depth == 2  # the rounds it was trained for


def test_lossy_recycle_keeps_every_draft_and_stops_at_max_tokens(start_server, tiny_model_dir, tmp_path):
    artifact = random_recycle_artifact(tiny_model_dir, tmp_path / "recycle.safetensors", list(range(0, 4096, 3)))
    server = start_server("--spec", "recycle", "--recycle-artifact", str(artifact), "--recycle-lossy")
    for max_tokens in (1, 2, 17):
        body = {"prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        assert usage["completion_tokens"] == max_tokens, usage
        spec = usage["speculative"]
        assert spec["accepted_tokens"] == spec["draft_tokens"] == (max_tokens - 1) // 2, spec
