"""The CPU's default dtype (int8) against fp32 on the real model: the quality bar `--dtype auto` relies
on, on a sample small enough for the suite (benchmarks/int8_quality.py measures 50 prompts), and the
split weights are what meet it (int8-fast, every weight whole, does not)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.int8_quality import TARGETS, greedy, teacher_forced_scores

DATA = Path(__file__).resolve().parents[1] / "data" / "spec_bench_excerpt.jsonl"
PROMPTS = 8


@pytest.fixture(scope="module")
def scores(default_model_dir) -> dict[str, dict]:
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine, pick_dtype

    assert pick_dtype("auto", "cpu") == "int8"
    engines = {dtype: LLMEngine(EngineConfig(model=str(default_model_dir), dtype=dtype, spec="none",
                                             cache=CacheConfig(num_tokens=4096)))
               for dtype in ("fp32", "int8", "int8-fast")}
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [r["prompt"] for r in rows[:: max(1, len(rows) // PROMPTS)][:PROMPTS]]
    tok = engines["fp32"].tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}])[:256] for t in texts]
    continuations = greedy(engines["fp32"], prompts, 24)
    return {dtype: teacher_forced_scores({"fp32": engines["fp32"], "int8": engines[dtype]}, prompts, continuations)
            for dtype in ("int8", "int8-fast")}


def test_int8_meets_the_bar_on_prompt_and_generated_text(scores):
    s = scores["int8"]
    assert s["positions_prompt"] > 500 and s["positions_generated"] > 100
    assert s["top1_agreement_prompt_text"] >= TARGETS["top1_agreement"], s
    assert s["top1_agreement_generated"] >= TARGETS["top1_agreement"], s
    assert abs(s["ppl_rel_diff"]) <= TARGETS["ppl_rel_diff"], s


def test_the_split_is_what_meets_it(scores):
    assert scores["int8-fast"]["top1_agreement"] < scores["int8"]["top1_agreement"] - 0.01, scores
