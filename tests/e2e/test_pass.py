"""PaSS end to end on the tiny random Llama: training data, trainer, artifacts, engine and server.

- the training forward (engine/train/frozen.py) gives the serving runner's look-ahead logits;
- `specd train data` resumes an interrupted file to the same records;
- a short training run lowers the loss, is deterministic under its seed, and resuming from a
  checkpoint gives the same embeddings as an uninterrupted run;
- wrong or missing artifacts and HTTP serving: test_trained_artifacts.py (with `bpd`).
The real-model lossless tests are in test_spec_lossless.py (two_call, the default, one look-ahead
row) and at the end here (fused, four look-ahead rows).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.spec.base import chain
from engine.train.artifact import weight_fingerprint
from engine.train.config import TrainConfig
from engine.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput
from tests.e2e.conftest import DATA_CONFIG

def test_training_forward_matches_the_serving_look_ahead_rows(tiny_model_dir):
    from engine.train.frozen import FrozenLlama
    from engine.train.pass_ import lookahead_logits

    runner = ModelRunner(ModelConfig.from_hf_dir(tiny_model_dir), tiny_model_dir, CacheConfig(4, 256),
                         linear_backend="dense")
    embeds = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    runner.set_lookahead(embeds)
    prompt = list(range(100, 110))
    r = Request("r", prompt, len(prompt), SamplingParams(), block_ids=list(range(8)))
    runner.execute(SchedulerOutput([ScheduledRequest(r, 9)]))
    r.num_computed_tokens = 9
    out = runner.execute(SchedulerOutput([ScheduledRequest(r, 1, chain([7, 8]), max_draft_tokens=5,
                                                           num_lookahead=3)]))
    frozen = FrozenLlama(tiny_model_dir)
    expected = lookahead_logits(frozen, frozen.prefix(prompt + [7, 8]), embeds, torch.tensor([11]))[0]
    torch.testing.assert_close(out.lookahead_logits, expected, atol=1e-4, rtol=1e-4)


def test_data_resumes_to_the_same_records(calm_model_dir, tiny_data, tmp_path):
    from engine.train.data import generate_data, read_records

    lines = tiny_data.read_text().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:5]) + lines[5][:40])  # meta + 4 records + a torn write
    n = generate_data(str(calm_model_dir), partial, DATA_CONFIG,
                      Path(__file__).resolve().parents[1] / "data", progress=False)
    full_meta, full = read_records(tiny_data)
    _, resumed = read_records(partial)
    assert n == len(full) == len(resumed) >= 10
    assert sorted((r.record_id, r.mode, r.output_ids) for r in resumed) == \
        sorted((r.record_id, r.mode, r.output_ids) for r in full)
    assert {r.mode for r in full} == {"greedy", "sample"}
    assert full_meta["base_model_hash"] == weight_fingerprint(calm_model_dir)


def _train(model_dir, tiny_data, steps=12, checkpoint=None, seed=0):
    from engine.train.data import read_records
    from engine.train.frozen import FrozenLlama
    from engine.train.pass_ import PassObjective, init_embeddings
    from engine.train.trainer import train

    _, records = read_records(tiny_data)
    frozen = FrozenLlama(model_dir)
    embeds = init_embeddings(frozen, 3)
    result = train([embeds], PassObjective(frozen, roots_per_example=16, eval_roots=16), records, records[:4],
                   TrainConfig(steps=steps, lr=3e-2, eval_every=steps, checkpoint_every=4, seed=seed),
                   checkpoint, progress=False)
    return embeds, result


@pytest.fixture(scope="module")
def trained(calm_model_dir, tiny_data):
    return _train(calm_model_dir, tiny_data)


def test_training_lowers_the_loss_deterministically(calm_model_dir, tiny_data, trained):
    embeds, result = trained
    before, after = result.evals[0], result.evals[-1]
    assert after["step"] == 12 and after["loss"] < before["loss"] - 0.1, (before, after)
    again, _ = _train(calm_model_dir, tiny_data)
    assert torch.equal(embeds, again)
    one_step = [_train(calm_model_dir, tiny_data, steps=1, seed=seed)[0] for seed in (0, 1)]
    assert not torch.equal(*one_step)  # the seed picks the split points


def test_resuming_a_checkpoint_equals_an_uninterrupted_run(calm_model_dir, tiny_data, trained, tmp_path, monkeypatch):
    from engine.train.pass_ import PassObjective

    uninterrupted, _ = trained
    real_loss, calls = PassObjective.loss, []

    def crash_at_step_7(self, *args):
        calls.append(None)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_loss(self, *args)

    monkeypatch.setattr(PassObjective, "loss", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        _train(calm_model_dir, tiny_data, checkpoint=tmp_path / "ckpt.pt")
    monkeypatch.setattr(PassObjective, "loss", real_loss)
    resumed, result = _train(calm_model_dir, tiny_data, checkpoint=tmp_path / "ckpt.pt")  # from step 4
    assert len(result.losses) == 12
    assert torch.equal(resumed, uninterrupted)


# ---------------------------------------------------------------- the real model, fused mode


@pytest.mark.real_model
def test_fused_greedy_equals_none_alone_and_mixed(default_model_dir):
    """The fused mode with 4 look-ahead rows (two_call with 1, the default, is in
    test_spec_lossless.py): token-identical to `none` alone and in a batch mixed with every other
    method (near-tie rule as there)."""
    from engine.engine import LLMEngine
    from tests.e2e.test_spec_lossless import assert_lossless, code_prompts, request, run, spec_bench_prompts

    engine = LLMEngine(EngineConfig(model=str(default_model_dir), spec="none", spec_adaptive=False,
                                    pass_mode="fused", pass_lookahead=4, cache=CacheConfig(num_tokens=16384)))
    short, _ = spec_bench_prompts()
    texts = short[:4] + code_prompts()[:2]
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    ref = [run(engine, [request(f"ref{i}", p, "none", logprobs=2)])[f"ref{i}"] for i, p in enumerate(prompts)]
    drafted = accepted = 0
    for i, p in enumerate(prompts):
        got = run(engine, [request(f"pass{i}", p, "pass")])[f"pass{i}"]
        assert_lossless(ref[i], got["tokens"], f"fused prompt {i}")
        drafted, accepted = drafted + got["spec"].draft_tokens, accepted + got["spec"].accepted_tokens
    assert drafted > 0 and accepted > 0
    methods = ["pass", "none", "ngram", "jacobi", "pass", "pass"]
    results = run(engine, [request(f"mix{i}", p, methods[i]) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        assert_lossless(ref[i], results[f"mix{i}"]["tokens"], f"fused mixed, prompt {i} ({methods[i]})")
