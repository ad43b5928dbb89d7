"""int8 against fp32 on held-out Spec-Bench prompts: the quality bar `--dtype auto` depends on.

For each prompt (chat-formatted, at most --max-len tokens) the fp32 model generates --gen-tokens
greedily; both models then score prompt + continuation teacher-forced: top-1 agreement of their
next-token predictions (reported on the prompt text, on the generated positions, and over both),
and the perplexity each gives the human-written prompt text; every int8 row there takes the int8
linears (served, only generated tokens do). The same scores for the int8 model's prompt path, which
served prompts take (fp32, or bf16 blocks on AMX hosts). The int8 model also generates as served, and
we record the first position where its output leaves the fp32 one (never = it all agrees).

    .venv/bin/python benchmarks/int8_quality.py [--prompts 60] [--gen-tokens 64] [--dtype int8|int8-fast]

Prints a table and one JSON line; writes benchmarks/results/<dtype>_quality.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, print_table  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.types import EngineRequest, Request, SamplingParams, ScheduledRequest, SchedulerOutput  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"top1_agreement": 0.98, "ppl_rel_diff": 0.02}


def held_out_prompts(count: int) -> list[str]:
    """Every k-th first-turn Spec-Bench prompt, so all categories are represented."""
    rows = [json.loads(line) for line in (DATA / "spec_bench_prompts_first_turn.jsonl").read_text().splitlines()]
    step = max(1, len(rows) // count)
    return [r["prompt"] for r in rows[::step][:count]]


def teacher_forced_logits(engine: LLMEngine, token_ids: list[int], as_prompt: bool = False) -> torch.Tensor:
    """Logits at every position of one sequence (one prefill; the engine is idle). By default the
    tokens are given as generated ones (no prompt), so under int8 every row takes the int8 path;
    as_prompt: every row takes the int8 dtypes' prompt path (fp32, or bf16 blocks on AMX hosts:
    engine/models/linear.py)."""
    runner = engine.runner
    block = engine.config.cache.block_size
    req = Request("quality", list(token_ids), len(token_ids) if as_prompt else 0, SamplingParams(),
                  block_ids=list(range(-(-len(token_ids) // block))))
    inputs = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(req, len(token_ids))]))
    hidden = runner.model.forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, runner.kv_caches)
    return runner.model.compute_logits(hidden)


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    for i, ids in enumerate(prompts):
        engine.add_request(EngineRequest(f"g{i}", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens)))
    outputs: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [outputs[f"g{i}"] for i in range(len(prompts))]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def teacher_forced_scores(engines: dict, prompts: list[list[int]], continuations: list[list[int]]) -> dict:
    """Teacher forcing along prompt + fp32 greedy continuation: top-1 agreement on the human-written
    prompt text and on the positions the model itself generates; perplexity of the prompt text.
    The same for the int8 model's prompt path ("prompt_path": what served prompts go through)."""
    agree = {"prompt": 0, "generated": 0, "prompt_path": 0}
    total = {"prompt": 0, "generated": 0}
    nll = {"fp32": 0.0, "int8": 0.0, "prompt_path": 0.0}
    for ids, cont in zip(prompts, continuations):
        logits = {d: teacher_forced_logits(e, ids + cont)[:-1] for d, e in engines.items()}
        logits["prompt_path"] = teacher_forced_logits(engines["int8"], ids + cont, as_prompt=True)[:-1]
        agree["prompt_path"] += int((logits["fp32"].argmax(-1) == logits["prompt_path"].argmax(-1)).sum())
        same = logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)
        split = len(ids) - 1  # rows before it predict prompt tokens, from it on the continuation
        for part, rows in (("prompt", same[:split]), ("generated", same[split:])):
            agree[part] += int(rows.sum())
            total[part] += len(rows)
        targets = torch.tensor(ids[1:])
        for d, lg in logits.items():
            nll[d] += float(torch.nn.functional.cross_entropy(lg[:split], targets, reduction="sum"))
    ppl = {d: math.exp(v / total["prompt"]) for d, v in nll.items()}
    return {
        "positions_prompt": total["prompt"], "positions_generated": total["generated"],
        "top1_agreement": (agree["prompt"] + agree["generated"]) / (total["prompt"] + total["generated"]),
        "top1_agreement_prompt_text": agree["prompt"] / total["prompt"],
        "top1_agreement_generated": agree["generated"] / total["generated"],
        "ppl_fp32": ppl["fp32"], "ppl_int8": ppl["int8"], "ppl_rel_diff": ppl["int8"] / ppl["fp32"] - 1,
        "prompt_path": engines["int8"].runner.model.prompt_linear_name,
        "top1_agreement_prompt_path": agree["prompt_path"] / (total["prompt"] + total["generated"]),
        "ppl_prompt_path_rel_diff": ppl["prompt_path"] / ppl["fp32"] - 1,
    }


def divergence_summary(reference: list[list[int]], candidate: list[list[int]], gen_tokens: int) -> dict:
    """Where int8 greedy output first leaves fp32's: median and a histogram over position ranges."""
    divergence = [first_divergence(a, b) for a, b in zip(reference, candidate)]
    diverged = sorted(d for d in divergence if d is not None)
    last = f"32-{gen_tokens - 1}"
    buckets = {"0-7": 0, "8-15": 0, "16-31": 0, last: 0, "never": 0}
    for d in divergence:
        buckets["never" if d is None else "0-7" if d < 8 else "8-15" if d < 16 else "16-31" if d < 32 else last] += 1
    return {"first_divergence_median": diverged[len(diverged) // 2] if diverged else None,
            "first_divergence_buckets": buckets}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="int8", choices=["int8", "int8-fast"])
    args = ap.parse_args()

    # KV room for every prompt and its continuation at once: a preempted request would be recomputed.
    cache = CacheConfig(num_tokens=args.prompts * (args.max_len + args.gen_tokens + 16))
    # Keyed "int8" whichever int8 dtype is measured (the table's names).
    engines = {name: LLMEngine(EngineConfig(model=args.model, device="cpu", dtype=dtype, spec="none", cache=cache))
               for name, dtype in (("fp32", "fp32"), ("int8", args.dtype))}
    tok = engines["fp32"].tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}])[: args.max_len] for p in held_out_prompts(args.prompts)]

    t0 = time.time()
    outs = {d: greedy(e, prompts, args.gen_tokens) for d, e in engines.items()}
    result = {"dtype": args.dtype, "prompts": len(prompts), "greedy_tokens": args.gen_tokens,
              **teacher_forced_scores(engines, prompts, outs["fp32"]),
              **divergence_summary(outs["fp32"], outs["int8"], args.gen_tokens),
              "seconds": round(time.time() - t0, 1)}
    # The bar holds on both kinds of text, not on their mixture.
    result["meets_bar"] = (min(result["top1_agreement_prompt_text"], result["top1_agreement_generated"],
                               result["top1_agreement_prompt_path"]) >= TARGETS["top1_agreement"]
                           and max(abs(result["ppl_rel_diff"]), abs(result["ppl_prompt_path_rel_diff"]))
                           <= TARGETS["ppl_rel_diff"])
    print_table([{"metric": k, "value": v} for k, v in result.items() if k != "first_divergence_buckets"],
                ["metric", "value"])
    print("first divergence of greedy outputs (position: prompts):", result["first_divergence_buckets"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.dtype.replace('-', '_')}_quality.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
