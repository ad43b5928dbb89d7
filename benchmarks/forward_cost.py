"""Time one engine forward (ModelRunner.execute) by batch shape: decode steps at batch B with a given
context, and verify-like steps with R rows per request. A script, not a test: it prints ms/step.

    .venv/bin/python benchmarks/forward_cost.py [--model DIR] [--context 600] [--batch 1 16] [--rows 1 2 4 8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  - sets how OpenMP threads wait, before torch loads
import torch  # noqa: E402

from engine.config import KV_CACHE_DTYPES, CacheConfig, ModelConfig  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.loader import resolve_model_dir  # noqa: E402
from engine.types import DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput  # noqa: E402


def _requests(batch: int, context: int, block_size: int, vocab: int) -> list[Request]:
    blocks_per_req = -(-(context + 64) // block_size)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for i in range(batch):
        ids = torch.randint(0, vocab, (context + 1,), generator=gen).tolist()
        block_ids = list(range(i * blocks_per_req, (i + 1) * blocks_per_req))
        reqs.append(Request(f"r{i}", ids, context, SamplingParams(), num_computed_tokens=context, block_ids=block_ids))
    return reqs


def time_step(runner: ModelRunner, sched: SchedulerOutput, reps: int) -> float:
    runner.execute(sched)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.execute(sched)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3  # median ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per request (1 + chain drafts)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--linear-backend", default="auto", choices=["auto", "dense", "onednn", "f32_matmul"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "int8", "int8-fast"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    cfg = ModelConfig.from_hf_dir(model_dir)
    block_size = 16
    max_batch = max(args.batch)
    num_tokens = max_batch * (-(-(args.context + 64) // block_size)) * block_size
    runner = ModelRunner(cfg, model_dir, CacheConfig(block_size, num_tokens, args.kv_cache_dtype), dtype=args.dtype,
                         linear_backend=args.linear_backend)
    print(f"model {model_dir.name}, linear backend {runner.model.linear_backend}, threads {torch.get_num_threads()}, "
          f"K/V cache {runner.kv_dtype}")
    for batch in args.batch:
        reqs = _requests(batch, args.context, block_size, cfg.vocab_size)
        # The context's K/V slots are left as they are (zeros): attention's cost does not depend on values.
        for rows in args.rows:
            scheduled = []
            for r in reqs:
                draft = DraftTree(list(range(rows - 1)), list(range(-1, rows - 2))) if rows > 1 else None
                scheduled.append(ScheduledRequest(r, 1, draft))
            ms = time_step(runner, SchedulerOutput(scheduled), args.reps)
            print(f"batch {batch:3d} rows/req {rows:2d} context {args.context}: {ms:7.1f} ms/step "
                  f"({batch * 1e3 / ms:6.1f} req-tok/s)")


if __name__ == "__main__":
    main()
