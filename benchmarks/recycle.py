"""`--spec recycle` at batch 1, engine only: lossless (draft controller on, and verifying every draft)
and `--recycle-lossy` (the paper's alternating decoding) against `none`, side by side in one run.

Each configuration runs every prompt alone (greedy, --max-tokens), in ABBA order over --rounds, and
reports output tokens per second, its ratio to `none`, drafts and accepted drafts per step, and whether
its outputs equal `none`'s token for token (the lossless contract). For the lossy mode it also reports
what its speed costs: the share of its outputs' tokens that equal `none`'s before they first differ,
and the mean negative log-likelihood per generated token the model itself gives each configuration's
outputs (teacher-forced; greedy `none` sets the baseline: a higher NLL is text the model finds less
likely).

    .venv/bin/python benchmarks/recycle.py [--per-category 3] [--max-tokens 128] [--dtype fp32] [--rounds 2]

Prints a table and one JSON line; writes benchmarks/results/recycle_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench, print_table, write_results  # noqa: E402
from benchmarks.int8_quality import first_divergence, teacher_forced_logits  # noqa: E402
from engine.config import DEFAULT_MODEL, CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.types import EngineRequest, SamplingParams, SpecParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # label -> (method, engine)
    "none": ("none", "lossless"),
    "recycle": ("recycle", "lossless"),
    "recycle verify-all": ("recycle", "verify_all"),
    "recycle lossy": ("recycle", "lossy"),
}


def generate(engine: LLMEngine, prompt: list[int], method: str, max_tokens: int, rid: str) -> dict:
    engine.add_request(EngineRequest(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                     SpecParams(method=method)))
    out = {"tokens": [], "drafts": 0, "accepted": 0, "steps": 0}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out["tokens"] += o.new_token_ids
            if o.finished and o.spec is not None:
                out["drafts"], out["accepted"], out["steps"] = o.spec.draft_tokens, o.spec.accepted_tokens, o.spec.steps
    return out


def add_abba_args(ap: argparse.ArgumentParser) -> None:
    """The flags of an engine-only batch-1 comparison (run_abba): prompts, length, dtype, rounds."""
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--rounds", type=int, default=2)


def run_abba(configs: dict[str, tuple[LLMEngine, str]], prompts: list[list[int]], max_tokens: int,
             rounds: int) -> tuple[dict, dict]:
    """Every prompt alone through each configuration (label -> (engine, method)). The configurations
    take turns prompt by prompt, in ABBA order (forward for one prompt, backward for the next), so a
    slow spell of a shared host, which lasts seconds to minutes here, falls on all of them. Returns
    (label -> summed tokens, seconds, drafts, accepted, steps; label -> the last round's outputs)."""
    totals = {label: {"tokens": 0, "seconds": 0.0, "drafts": 0, "accepted": 0, "steps": 0} for label in configs}
    outputs: dict[str, list[list[int]]] = {label: [None] * len(prompts) for label in configs}
    labels = list(configs)
    for rnd in range(rounds):
        for i, prompt in enumerate(prompts):
            for label in labels[:: 1 if (rnd * len(prompts) + i) % 2 == 0 else -1]:
                engine, method = configs[label]
                start = time.perf_counter()
                out = generate(engine, prompt, method, max_tokens, f"{label}-{rnd}-{i}")
                t = totals[label]
                t["seconds"] += time.perf_counter() - start
                t["tokens"] += len(out["tokens"])
                for key in ("drafts", "accepted", "steps"):
                    t[key] += out[key]
                outputs[label][i] = out["tokens"]
    return totals, outputs


def mean_nll(engine: LLMEngine, prompt: list[int], output: list[int]) -> float:
    """The model's mean negative log-likelihood of `output` after `prompt`, teacher-forced."""
    logits = teacher_forced_logits(engine, prompt + output, as_prompt=True)[len(prompt) - 1:-1]
    return float(F.cross_entropy(logits.float(), torch.tensor(output), reduction="mean"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_abba_args(ap)
    ap.add_argument("--artifact", default=None, help="recycle artifact (default: the committed one)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="configurations to run (none always runs: the others are measured against it)")
    ap.add_argument("--out", default=str(RESULTS / "recycle_cpu.json"))
    args = ap.parse_args()
    configs = ["none"] + [c for c in args.configs if c != "none"]

    def engine(adaptive: bool = True, lossy: bool = False) -> LLMEngine:
        return LLMEngine(EngineConfig(model=DEFAULT_MODEL, spec="none", dtype=args.dtype, spec_adaptive=adaptive,
                                      recycle_artifact=args.artifact, recycle_lossy=lossy,
                                      cache=CacheConfig(num_tokens=16384)))

    makers = {"lossless": engine, "verify_all": lambda: engine(adaptive=False), "lossy": lambda: engine(lossy=True)}
    engines = {which: makers[which]() for which in {"lossless"} | {CONFIGS[c][1] for c in configs}}
    rows_in = load_spec_bench(args.per_category)
    tokenizer = engines["lossless"].tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows_in]
    totals, outputs = run_abba({label: (engines[CONFIGS[label][1]], CONFIGS[label][0]) for label in configs},
                               prompts, args.max_tokens, args.rounds)
    base = totals["none"]["tokens"] / totals["none"]["seconds"]
    scorer = engines["lossless"]
    rows = []
    for label, t in totals.items():
        same = sum(a == b for a, b in zip(outputs[label], outputs["none"]))
        agree = [first_divergence(a, b) for a, b in zip(outputs[label], outputs["none"])]
        agreed = sum(len(a) if d is None else d for a, d in zip(outputs[label], agree))
        nll = [mean_nll(scorer, p, o) for p, o in zip(prompts, outputs[label]) if o]
        rows.append({"config": label, "tok_s": round(t["tokens"] / t["seconds"], 2),
                     "vs_none": round(t["tokens"] / t["seconds"] / base, 3),
                     "drafts_per_step": round(t["drafts"] / max(1, t["steps"]), 3),
                     "accepted_per_step": round(t["accepted"] / max(1, t["steps"]), 3),
                     "identical_outputs": f"{same}/{len(prompts)}",
                     "tokens_before_divergence": round(agreed / max(1, sum(map(len, outputs[label]))), 3),
                     "mean_nll": round(sum(nll) / len(nll), 4)})
    print(f"recycle at batch 1, {args.dtype}, {len(prompts)} Spec-Bench prompts x {args.rounds} rounds (ABBA), "
          f"max_tokens {args.max_tokens}, greedy")
    print_table(rows, list(rows[0]))
    write_results({"benchmark": "recycle", "dtype": args.dtype, "prompts": len(prompts), "rounds": args.rounds,
                   "max_tokens": args.max_tokens, "rows": rows}, Path(args.out))


if __name__ == "__main__":
    main()
