"""Kernel benchmark (needs a CUDA GPU): the Triton ragged paged attention against torch SDPA and
against the GPU's own copy bandwidth, and the engine's decode / verify step cost on a ~1B Llama
with random bf16 weights.

    .venv/bin/python benchmarks/kernels.py [--quick] [--no-e2e] [--out benchmarks/results/kernels_h100.json]

Attention (bf16, 32 query heads, 8 KV heads, head_dim 64 and 128, block size 16, blocks shuffled):
- decode: batch 1-64 x context 512-8k; verify: 8 and 32 chain drafts per request (causal rows);
- per case: the Triton kernel through the engine's dispatch (plan once, as every layer does), its
  achieved bandwidth (K/V + q + out bytes / time) as a fraction of the measured device-to-device
  copy bandwidth, SDPA looped over requests, and one padded SDPA batch. Both SDPA baselines are
  handed contiguous per-request K/V (no paging, no gather counted): a generous baseline.
- small batch, long context: split-KV (flash-decoding) against the same kernel forced to one split.
End to end (`ModelRunner`, bf16, CUDA): decode tokens/s at batch 1, 16, 64 after a 512-token
prompt, and a verify step (1 + 8 chain drafts per request) relative to a plain decode step.
Targets (issue 4): decode attention >= 60% of copy bandwidth at batch >= 16 and context >= 1k; a
verify step with 8 drafts for 32 requests <= 1.3x a plain decode step of the same batch.

Without CUDA it says so and exits 0. `--smoke` runs every code path on tiny shapes in Triton's CPU
interpreter instead (the timings then mean nothing): a check of this script, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=8192,
                tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TINY = dict(LLAMA_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (about a minute on an H100)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the 1B-model engine steps")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter (no GPU)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default benchmarks/results/kernels_<gpu>.json)")
    return ap.parse_args()


# ---------------------------------------------------------------- timing


def bench(fn, device) -> float:
    """Median milliseconds of fn() (Triton's do_bench on a GPU: warm-up, L2 flushed between runs)."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    return statistics.median(_time_calls(fn, device, 2))


def copy_bandwidth(device, num_bytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * num_bytes / (ms * 1e-3)


# ---------------------------------------------------------------- attention


def attention_inputs(batch, ctx, q_len, heads, kv_heads, head_dim, device, dtype, block_size=16):
    import torch
    kv_len = ctx + q_len
    blocks_per = math.ceil(kv_len / block_size)
    num_blocks = batch * blocks_per
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per).to(torch.int32)
    q = torch.randn(batch * q_len, heads, head_dim, device=device, dtype=dtype)
    cu_q = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    kv_lens = torch.full((batch,), kv_len, device=device, dtype=torch.int32)
    # The SDPA baselines get each request's K/V contiguous: [batch, kv_heads, kv_len, head_dim].
    def gather(cache):
        return cache[block_tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :kv_len].transpose(1, 2).contiguous()
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cu_q=cu_q, kv_lens=kv_lens,
                k=gather(k_cache), v=gather(v_cache), kv_len=kv_len, q_len=q_len, batch=batch)


def attention_case(batch, ctx, q_len, heads, kv_heads, head_dim, device, dtype, copy_bw) -> dict:
    import torch
    import torch.nn.functional as F
    from specd_kernels import attention
    from specd_kernels.attention import triton as attention_triton

    x = attention_inputs(batch, ctx, q_len, heads, kv_heads, head_dim, device, dtype)
    scale = head_dim ** -0.5
    group = heads // kv_heads
    plan = attention.plan_attention(x["cu_q"], x["kv_lens"], x["block_tables"], 16, group)
    out = torch.empty_like(x["q"])
    cfg = attention_triton.launch_config(plan, x["q"].shape[0], head_dim, kv_heads, x["q"].device)
    t_triton = bench(lambda: attention.paged_attention(x["q"], x["k_cache"], x["v_cache"], x["cu_q"], x["kv_lens"],
                                                       x["block_tables"], scale, out=out, plan=plan), device)
    kv_len = x["kv_len"]
    mask = None
    if q_len > 1:  # verify rows: the context plus a causal block over the drafts
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    qb = x["q"].view(batch, q_len, heads, head_dim).transpose(1, 2)  # [batch, heads, q_len, head_dim]

    def loop():
        for i in range(batch):
            F.scaled_dot_product_attention(qb[i:i + 1], x["k"][i:i + 1], x["v"][i:i + 1], attn_mask=mask,
                                           scale=scale, enable_gqa=True)

    def padded():
        F.scaled_dot_product_attention(qb, x["k"], x["v"], attn_mask=mask, scale=scale, enable_gqa=True)

    t_loop, t_padded = bench(loop, device), bench(padded, device)
    elt = x["q"].element_size()
    num_bytes = (2 * batch * kv_len * kv_heads * head_dim + 2 * x["q"].numel()) * elt
    bw = num_bytes / (t_triton * 1e-3)
    row = dict(batch=batch, ctx=ctx, q_len=q_len, head_dim=head_dim, triton_ms=t_triton, sdpa_loop_ms=t_loop,
               sdpa_padded_ms=t_padded, bandwidth_gbs=bw / 1e9, frac_of_copy=bw / copy_bw,
               num_splits=cfg["NUM_SPLITS"], block_q=cfg["BLOCK_Q"])
    if cfg["NUM_SPLITS"] > 1:  # what flash-decoding buys: the same launch forced to one split
        one = attention_triton.plan_attention(x["cu_q"], x["kv_lens"], x["block_tables"], 16, group, num_splits=1)
        row["one_split_ms"] = bench(lambda: attention.paged_attention(
            x["q"], x["k_cache"], x["v_cache"], x["cu_q"], x["kv_lens"], x["block_tables"], scale, out=out,
            plan=one), device)
    del x
    return row


def attention_suite(args, device, dtype, copy_bw) -> list[dict]:
    if args.smoke:
        grid = [(b, c, q, 64) for b in (1, 3) for c in (40, 200) for q in (1, 9)]
        heads, kv_heads = 4, 2
    else:
        batches = (1, 16, 64) if args.quick else (1, 4, 16, 32, 64)
        ctxs = (1024, 4096) if args.quick else (512, 1024, 2048, 4096, 8192)
        dims = (64,) if args.quick else (64, 128)
        grid = [(b, c, 1, d) for d in dims for b in batches for c in ctxs]
        grid += [(b, c, 1 + drafts, d) for d in dims for drafts in (8, 32) for b in (1, 16, 32, 64)
                 for c in ((1024,) if args.quick else (1024, 4096))]
        heads, kv_heads = 32, 8
    rows = []
    for batch, ctx, q_len, head_dim in grid:
        row = attention_case(batch, ctx, q_len, heads, kv_heads, head_dim, device, dtype, copy_bw)
        rows.append(row)
        print(_fmt_attention(row), flush=True)
    return rows


def _fmt_attention(r: dict) -> str:
    kind = "decode" if r["q_len"] == 1 else f"verify{r['q_len'] - 1}"
    split = f" splits {r['num_splits']}" + (f" (1 split {r['one_split_ms']:.3f} ms)" if "one_split_ms" in r else "")
    return (f"{kind:>8} d{r['head_dim']:<3} batch {r['batch']:>3} ctx {r['ctx']:>5}: triton {r['triton_ms']:.3f} ms "
            f"({r['bandwidth_gbs']:.0f} GB/s, {100 * r['frac_of_copy']:.0f}% of copy) | sdpa loop "
            f"{r['sdpa_loop_ms']:.3f} ms ({r['sdpa_loop_ms'] / r['triton_ms']:.1f}x) | sdpa padded "
            f"{r['sdpa_padded_ms']:.3f} ms ({r['sdpa_padded_ms'] / r['triton_ms']:.1f}x) |{split}")


# ---------------------------------------------------------------- engine steps


def engine_suite(args, device) -> list[dict]:
    """Decode and verify steps of ModelRunner on a random-weight Llama (1B on a GPU, tiny in --smoke)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.config import CacheConfig, ModelConfig
    from engine.model_runner import ModelRunner

    params = TINY if args.smoke else LLAMA_1B
    prompt_len = 24 if args.smoke else 512
    batches = (1, 3) if args.smoke else (1, 16, 32, 64)
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**params)).to(torch.bfloat16)
        hf.save_pretrained(model_dir)
        num_params = sum(p.numel() for p in hf.parameters())
        del hf
        cfg = ModelConfig.from_hf_dir(model_dir)
        capacity = max(batches) * (prompt_len + 64)
        runner = ModelRunner(cfg, Path(model_dir), CacheConfig(16, capacity), device=device.type, dtype="bf16")
        rows = [engine_case(runner, batch, prompt_len, cfg.vocab_size, device) for batch in batches]
    for row in rows:
        row["params"] = num_params
        print(f"engine batch {row['batch']:>3}: decode {row['decode_ms']:.2f} ms/step = {row['decode_tok_s']:.0f} tok/s;"
              f" verify (1+8 drafts) {row['verify_ms']:.2f} ms = {row['verify_over_decode']:.2f}x decode;"
              f" greedy acceptance {row['accept_ms']:.3f} ms", flush=True)
    return rows


def engine_case(runner, batch, prompt_len, vocab, device) -> dict:
    import torch
    from engine.types import DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput
    from engine.verifier import verify

    gen = torch.Generator().manual_seed(batch)
    per_req = math.ceil((prompt_len + 64) / 16)
    reqs = [Request(f"r{i}", torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(), prompt_len,
                    SamplingParams(), block_ids=list(range(i * per_req, (i + 1) * per_req))) for i in range(batch)]
    for r in reqs:  # prefill one request per step
        runner.execute(SchedulerOutput([ScheduledRequest(r, prompt_len)]))
        r.num_computed_tokens = prompt_len

    def step(drafts: int):
        for r in reqs:  # one new token each; drafts, when any, are rolled back (not computed)
            if r.num_tokens == r.num_computed_tokens:
                r.token_ids.append(int(torch.randint(3, vocab, (1,), generator=gen)))
        chain = DraftTree(list(range(5, 5 + drafts)), list(range(-1, drafts - 1))) if drafts else None
        return runner.execute(SchedulerOutput([ScheduledRequest(r, 1, chain) for r in reqs]))

    def timed(drafts: int, reps: int) -> float:  # the whole step as the engine runs it: host work included
        return statistics.median(_time_calls(lambda: step(drafts), device, reps))

    reps = 3 if device.type == "cpu" else 20
    timed(0, 2)
    decode_ms = timed(0, reps)  # K/V of the decode tokens are never advanced past: the same slot each time
    verify_ms = timed(8, reps)
    logits = step(8).logits  # [batch * 9, vocab]
    targets = logits.argmax(-1)
    trees = [DraftTree(list(range(5, 13)), list(range(-1, 7)))] * batch
    cu_rows = list(range(0, 9 * batch + 1, 9))
    accept_ms = statistics.median(_time_calls(lambda: verify([r.request_id for r in reqs], trees, cu_rows,
                                                              [True] * batch, targets), device, reps))
    return dict(batch=batch, prompt_len=prompt_len, decode_ms=decode_ms, decode_tok_s=batch / (decode_ms * 1e-3),
                verify_ms=verify_ms, verify_over_decode=verify_ms / decode_ms, accept_ms=accept_ms)


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn, device, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


# ---------------------------------------------------------------- main


def targets(attn: list[dict], engine: list[dict]) -> dict:
    decode = [r for r in attn if r["q_len"] == 1 and r["batch"] >= 16 and r["ctx"] >= 1024]
    verify32 = [r for r in engine if r["batch"] == 32]
    return {
        "decode_attention_min_frac_of_copy": min((r["frac_of_copy"] for r in decode), default=None),
        "decode_attention_target": 0.60,
        "verify8_batch32_over_decode": verify32[0]["verify_over_decode"] if verify32 else None,
        "verify_target": 1.3,
    }


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/kernels.py measures GPU kernels, and torch sees no CUDA device here: nothing measured.\n"
              "Run it on a machine with an NVIDIA GPU, or add --smoke to exercise its code paths on tiny shapes "
              "in Triton's CPU interpreter (timings meaningless).")
        return 0
    from specd_kernels import backend
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        backend.set_backend("triton")  # interpreted: the same launchers and kernels as on a GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    copy_bw = copy_bandwidth(device, 1 << (30 if device.type == "cuda" else 24))
    print(f"device: {name}; copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    attn = attention_suite(args, device, torch.bfloat16, copy_bw)
    engine = [] if args.no_e2e else engine_suite(args, device)
    result = dict(device=name, torch=torch.__version__, copy_bandwidth_gbs=copy_bw / 1e9, attention=attn,
                  engine=engine, targets=targets(attn, engine), smoke=args.smoke,
                  command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    print(json.dumps(result["targets"]))
    out = args.out
    if out is None and not args.smoke:
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        out = ROOT / "benchmarks" / "results" / f"kernels_{slug}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
