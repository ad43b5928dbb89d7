"""Lossless greedy speculation on the real default model: every drafter == `--spec none`, token for token.

20 prompts (Spec-Bench categories, code rewrites, long-context summaries), each method alone and in
a mixed batch of 8 requests with different methods and lengths. The cost controller is off
(spec_adaptive=False) so every proposed draft is really verified. A token may differ only at a
near-tie of the reference (top-2 logprob gap < NEAR_TIE), as in the batching test.
"""
from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from engine.types import EngineRequest, SamplingParams, SpecParams

NEAR_TIE = 1e-3
MAX_TOKENS = 32
DATA = Path(__file__).resolve().parents[1] / "data" / "spec_bench_excerpt.jsonl"
METHODS = ("ngram", "jacobi", "pass", "bpd", "recycle")  # pass, bpd, recycle: the committed artifacts
# (pass in two_call mode)


def code_prompts() -> list[str]:
    import json as json_mod
    import textwrap as textwrap_mod

    sources = [inspect.getsource(textwrap_mod.indent), inspect.getsource(textwrap_mod.dedent)[:1500],
               inspect.getsource(json_mod.dump)[:1500], inspect.getsource(textwrap_mod.shorten)]
    return [f"Rewrite this Python function with type hints, keeping its behaviour:\n\n{src}" for src in sources]


def spec_bench_prompts() -> tuple[list[str], list[str]]:
    """Two short prompts per category, and four long-context summarization prompts."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    short, seen = [], {}
    for row in rows:
        if seen.get(row["category"], 0) < 1 and len(row["prompt"]) < 1500:
            seen[row["category"]] = seen.get(row["category"], 0) + 1
            short.append(row["prompt"])
    summaries = sorted((r["prompt"] for r in rows if r["category"] == "summarization"), key=len)
    long_ctx = [p for p in summaries if 2000 < len(p) < 5000][:4]
    return short[:12], long_ctx


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request, default_model_dir):
    """Lossless holds per dtype: int8 drafts are checked against int8 plain decoding."""
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(default_model_dir), spec="none", spec_adaptive=False,
                                  dtype=request.param, cache=CacheConfig(num_tokens=32768)))


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    short, long_ctx = spec_bench_prompts()
    texts = short + code_prompts() + long_ctx
    assert len(texts) >= 20, len(texts)
    return [engine.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts[:20]]


def run(engine, requests: list[EngineRequest]) -> dict[str, dict]:
    """Run to completion; per request: tokens, logprobs (if asked), spec usage."""
    results = {r.request_id: {"tokens": [], "logprobs": [], "spec": None} for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished_requests():
        for out in engine.step():
            res = results[out.request_id]
            res["tokens"] += out.new_token_ids
            res["logprobs"] += out.new_logprobs or []
            res["spec"] = out.spec
    assert engine.kv.usage == 0.0, "KV blocks leaked"
    return results


def request(rid: str, prompt: list[int], method: str, max_tokens: int = MAX_TOKENS, logprobs=None) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs),
                         SpecParams(method=method))


@pytest.fixture(scope="module")
def reference(engine, prompts) -> list[dict]:
    return [run(engine, [request(f"ref{i}", p, "none", logprobs=2)])[f"ref{i}"] for i, p in enumerate(prompts)]


def row_exact(engine) -> bool:
    """Steps are row-exact when the C kernels built (specd_kernels/cbuild.py; no C compiler: the torch
    references run, and the near-tie rule applies): int8's, or fp32's through specd_kernels/f32_matmul."""
    from specd_kernels.attention import cpu
    from specd_kernels.rowscale import uses_c

    if cpu.load() is None:
        return False
    if engine.config.dtype == "fp32":
        return engine.runner.model.linear_backend == "f32_matmul"
    return engine.config.dtype == "int8" and uses_c()


def assert_lossless(ref: dict, got: list[int], label: str, exact: bool = False) -> None:
    """Token-identical, except (unless exact) after a near tie: torch's fp32 matmuls round differently by
    row count. int8 is exact: its matmuls accumulate in int32 per row; so is fp32 through specd_kernels/
    f32_matmul (one multiply-add chain per output); and the attention (specd_kernels/attention/cpu.c) gives
    every row the same bits whatever the step's shape."""
    n = min(len(ref["tokens"]), len(got))
    for i in range(n):
        if ref["tokens"][i] != got[i]:
            assert not exact, f"{label}: token {i} differs ({got[i]} vs {ref['tokens'][i]})"
            top = ref["logprobs"][i].top
            gap = top[0][1] - top[1][1]
            assert gap < NEAR_TIE, f"{label}: token {i} differs ({got[i]} vs {ref['tokens'][i]}), top-2 gap {gap:.2e}"
            return
    assert got == ref["tokens"][:len(got)] and len(got) == len(ref["tokens"]), f"{label}: lengths differ"


@pytest.mark.real_model
@pytest.mark.parametrize("method", METHODS)
def test_each_method_alone_equals_none(engine, prompts, reference, method):
    total_draft = total_accepted = 0
    # int8 repeats the check on every 3rd prompt (all categories, code and long context) to keep the suite fast.
    indices = range(0, len(prompts), 1 if engine.config.dtype == "fp32" else 3)
    for i in indices:
        got = run(engine, [request(f"{method}{i}", prompts[i], method)])[f"{method}{i}"]
        assert_lossless(reference[i], got["tokens"], f"{method} prompt {i}", exact=row_exact(engine))
        total_draft += got["spec"].draft_tokens
        total_accepted += got["spec"].accepted_tokens
    assert total_draft > 0 and total_accepted > 0, f"{method} never drafted or never accepted"


@pytest.mark.real_model
def test_mixed_batch_of_8_equals_none(engine, prompts, reference):
    methods = ["none", "ngram", "jacobi", "pass", "bpd", "recycle"]
    picks = [0, 3, 6, 9, 12, 14, 16, 19]
    batch = [request(f"mix{i}", prompts[i], methods[k % len(methods)], max_tokens=MAX_TOKENS - 4 * (k % 3))
             for k, i in enumerate(picks)]
    results = run(engine, batch)
    for k, i in enumerate(picks):
        got = results[f"mix{i}"]["tokens"]
        assert len(got) == MAX_TOKENS - 4 * (k % 3) or got[-1] in engine.eos_token_ids
        ref = dict(reference[i], tokens=reference[i]["tokens"][:len(got)])
        assert_lossless(ref, got, f"mixed batch, prompt {i} ({methods[k % len(methods)]})", exact=row_exact(engine))


@pytest.mark.real_model
def test_batch_of_16_equals_each_alone(engine, prompts, reference):
    """Plain decoding of 16 requests in one ragged batch gives each one its solo tokens (with int8
    weights too: activation scales are per row, so a request's numbers ignore its neighbours)."""
    results = run(engine, [request(f"b16_{i}", p, "none") for i, p in enumerate(prompts[:16])])
    for i in range(16):
        assert_lossless(reference[i], results[f"b16_{i}"]["tokens"], f"batch of 16, prompt {i}",
                        exact=row_exact(engine))
