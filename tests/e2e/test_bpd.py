"""BPD heads end to end on the tiny random Llama: training and artifacts.

- training lowers the loss it optimises, deterministically under its seed;
- `train_bpd` writes an artifact (with its provenance) that the engine serves.
Wrong or missing artifacts and HTTP serving: test_trained_artifacts.py (with `pass`). The real-model lossless tests are in test_spec_lossless.py, the sampling law in test_spec_sampling.py.
"""
from __future__ import annotations

import torch

from engine.config import CacheConfig, EngineConfig
from engine.train.config import TrainConfig
from tests.e2e.conftest import check_trained_artifact


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
    check_trained_artifact(header, out, "bpd", calm_model_dir, num_heads=2)
    engine = LLMEngine(EngineConfig(model=str(calm_model_dir), spec="bpd", bpd_artifact=str(out),
                                    cache=CacheConfig(num_tokens=2048)))
    assert engine.spec.num_heads == 2
