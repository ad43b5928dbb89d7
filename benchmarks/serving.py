"""Serving benchmark: specd at several concurrencies and HF transformers `generate` at batch 1, one run.

Spec-Bench first-turn prompts (chat-templated, greedy, max_tokens 128). Reports output tok/s
(aggregate over the run's wall time, prompt processing included), TTFT and inter-token latency
p50/p99; prints a table and one JSON line, and writes the JSON to --out with PNG charts beside it
(throughput and batching speedup by concurrency, latency percentiles). specd runs with its defaults,
so `--spec ngram` since session 20; `--server-args "--spec none"` measures plain decoding, as the
results before it did. Usage:

    .venv/bin/python benchmarks/serving.py [--per-category 5] [--concurrency 1 4 16] [--no-hf]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Server, latency_summary, load_spec_bench, percentile,  # noqa: E402
                               print_table, run_load, write_results)

RESULTS = Path(__file__).resolve().parent / "results"


def specd_rows(prompts, concurrencies, max_tokens, server_args) -> list[dict]:
    rows = []
    with Server(*server_args) as server:
        asyncio.run(run_load(server.url, prompts[:2], 1, 8))  # warm-up
        for concurrency in concurrencies:
            timings, wall = asyncio.run(run_load(server.url, prompts, concurrency, max_tokens))
            rows.append({
                "system": "specd", "concurrency": concurrency,
                "output_tok_s": sum(t.num_output_tokens for t in timings) / wall,
                **latency_summary(timings),
                "requests": len(timings), "wall_s": wall,
            })
    return rows


def hf_row(prompts, max_tokens, model_dir) -> dict:
    """The peer: HF transformers generate, batch 1, greedy, fp32, on the same chat-templated prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total_tokens, ttfts, start = 0, [], time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - t0)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            total_tokens += out.shape[1] - ids["input_ids"].shape[1]
    # The TTFT probe ran each prompt's prefill twice; charge only the full generate to throughput.
    wall = time.perf_counter() - start - sum(ttfts)
    return {"system": "hf-generate", "concurrency": 1, "output_tok_s": total_tokens / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "requests": len(prompts), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--server-args", default="", help="extra `specd serve` flags, quoted")
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.json", help="result JSON; PNG charts go beside it")
    args = ap.parse_args()

    prompts = load_spec_bench(args.per_category)
    rows = specd_rows(prompts, args.concurrency, args.max_tokens, args.server_args.split())
    if not args.no_hf:
        from engine.models.loader import resolve_model_dir
        rows.append(hf_row(prompts, args.max_tokens, resolve_model_dir("SmolLM2-135M-Instruct")))
    summary = summarize(rows)
    print_table(rows, ["system", "concurrency", "output_tok_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                       "requests", "wall_s"])
    write_results({"benchmark": "serving", "prompts": len(prompts), "max_tokens": args.max_tokens,
                   "rows": rows, **summary}, args.out)


def summarize(rows: list[dict]) -> dict:
    by = {(r["system"], r["concurrency"]): r["output_tok_s"] for r in rows}
    out = {}
    if ("specd", 1) in by and ("hf-generate", 1) in by:
        out["batch1_vs_hf"] = by[("specd", 1)] / by[("hf-generate", 1)]
    if ("specd", 1) in by and ("specd", 16) in by:
        out["c16_vs_c1"] = by[("specd", 16)] / by[("specd", 1)]
    return out


if __name__ == "__main__":
    main()
