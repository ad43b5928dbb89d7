"""Where a served step's time goes: every op of the engine's step timed in place, by step shape.

The real engine (default model, `--dtype`, `--spec none`, greedy) runs decoding steps at each
--batch (requests with --context tokens of context, all decoding), and a prompt step of --prompt
tokens; each op is wrapped with a timer where the engine calls it, so the times are those of a
served step (cold caches, the step's own threads), plus ~1 us of wrapper per call. Ops:

- scheduler (Scheduler.schedule), inputs (ModelRunner.prepare_inputs: the flat batch, slots, plan),
- int8 layers' matmuls (fbgemm), their C gaps (specd_kernels/decoder: row scaling, RMSNorm, RoPE + K/V
  store, attention, skip connections), SwiGLU; on the layer-by-op path (prompt rows): linears,
  RMSNorm, RoPE + store, attention,
- logits (lm_head + exact rescoring), verify (greedy acceptance = sampling), output (tokens appended,
  stop checks, detokenizing), and the step total.

Then torch.compile against eager on the elementwise ops between the matmuls (SwiGLU; RMSNorm and
the cast of the bf16 prompt path) at 1, 16 and 256 rows: time per call, same bits or not, and the
compile time (issue 7 asks for torch.compile where it measurably helps).

    .venv/bin/python benchmarks/op_costs.py [--dtype int8] [--batch 1 16] [--context 400] [--prompt 256]

Prints tables (ms per step; us per call) and one JSON line; writes benchmarks/results/op_costs_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402,F401  - sets how OpenMP threads wait, before torch loads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import print_table, write_results  # noqa: E402
from engine import engine as engine_module  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.models import int8, int8_layers, llama, linear  # noqa: E402
from engine.types import EngineRequest, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
C_GAPS = ("decoder_before_qkv", "decoder_after_qkv", "decoder_after_o", "decoder_after_gate_up",
          "decoder_before_down", "decoder_after_down")
C_TILED = ("decoder_attention_tiled", "decoder_down_tiled")  # where AMX runs: the matmuls inside


class Timers:
    """Seconds per op name, summed while `active`."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.active = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - start
        return timed


class _TimedLib:
    """The decoder's C library with each gap timed under one name."""

    def __init__(self, lib, timers: Timers):
        for name in C_GAPS:
            setattr(self, name, timers.wrap("C gaps (norms, RoPE+store, attention, skips)", getattr(lib, name)))
        for name in C_TILED:
            setattr(self, name, timers.wrap("C layers (gaps + matmuls on AMX tiles)", getattr(lib, name)))


class _TimedF:
    """torch.nn.functional with the ops the layers call by name timed."""

    def __init__(self, module, timers: Timers, names: dict[str, str]):
        self._module = module
        for attr, label in names.items():
            setattr(self, attr, timers.wrap(label, getattr(module, attr)))

    def __getattr__(self, attr):
        return getattr(self._module, attr)


def instrument(eng: LLMEngine, timers: Timers) -> None:
    model = eng.runner.model
    if model.int8_layers is not None:
        model.int8_layers.lib = _TimedLib(model.int8_layers.lib, timers)
        int8_layers.F = _TimedF(int8_layers.F, timers, {"silu": "SwiGLU"})
        # int8_layers reads int8.matmul per step: a stand-in module with it timed, so the
        # logits' own int8 matmul (RowScaledInt8Linear) is not counted twice
        int8_layers.int8 = _TimedF(int8, timers, {"matmul": "matmuls (int8 layers)"})
    llama.F = _TimedF(llama.F, timers, {"silu": "SwiGLU"})
    linear.F = _TimedF(linear.F, timers, {"rms_norm": "RMSNorm (layer-by-op)"})
    if model.prompt_rows_dense:
        lin = model._linear
        lin.dense.matmul = timers.wrap("linears (prompt rows)", lin.dense.matmul)
        if lin.dense_mlp is not None:
            lin.dense_mlp = timers.wrap("gate/up + SwiGLU + down (prompt rows, fused)", lin.dense_mlp)
    llama.rotate_and_store = timers.wrap("RoPE + K/V store (layer-by-op)", llama.rotate_and_store)
    llama.paged_attention = timers.wrap("attention (layer-by-op)", llama.paged_attention)
    model.compute_logits = timers.wrap("logits (lm_head + rescoring)", model.compute_logits)
    eng.runner.prepare_inputs = timers.wrap("inputs (flat batch, slots, plan)", eng.runner.prepare_inputs)
    eng.scheduler.schedule = timers.wrap("scheduler", eng.scheduler.schedule)
    engine_module.verify_step = timers.wrap("verify / sample", engine_module.verify_step)
    eng._append_tokens = timers.wrap("output (append, stops, detokenize)", eng._append_tokens)
    eng.step = timers.wrap("step total", eng.step)


def prompt_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure_decode(eng: LLMEngine, timers: Timers, batch: int, context: int, steps: int) -> dict[str, float]:
    """ms per step of `steps` decoding steps of `batch` requests past their prompts."""
    for i in range(batch):
        eng.add_request(EngineRequest(f"b{batch}-{i}", prompt_ids(context, i),
                                      SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)))
    while eng.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
        eng.step()  # the prompts, untimed
    for _ in range(3):
        eng.step()  # warm-up
    timers.total.clear()
    timers.active = True
    for _ in range(steps):
        eng.step()
    timers.active = False
    while eng.has_unfinished_requests():
        eng.step()
    return {name: 1e3 * t / steps for name, t in timers.total.items()}


def measure_prompt(eng: LLMEngine, timers: Timers, tokens: int, reps: int) -> dict[str, float]:
    """ms per step of a `tokens`-token prompt in one step (max_tokens 1)."""
    timers.total.clear()
    for rep in range(reps + 1):
        timers.active = rep > 0  # the first is a warm-up
        eng.add_request(EngineRequest(f"p{rep}", prompt_ids(tokens, 100 + rep), SamplingParams(max_tokens=1)))
        while eng.has_unfinished_requests():
            eng.step()
    timers.active = False
    return {name: 1e3 * t / reps for name, t in timers.total.items()}


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # as the layers write it


def _norm_to_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-5).to(torch.bfloat16)  # the bf16 prompt path's input


def compile_check(hidden: int, inter: int, reps: int = 200) -> list[dict]:
    """us per call, eager against torch.compile (dynamic shapes), for each op and row count."""
    def per_call(fn, *args):
        for _ in range(5):
            fn(*args)
        start = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        return (time.perf_counter() - start) / reps * 1e6

    rows_out = []
    for name, fn, make in (("SwiGLU", _swiglu, lambda m: (torch.randn(m, 2 * inter),)),
                           ("RMSNorm + bf16 cast", _norm_to_bf16, lambda m: (torch.randn(m, hidden), torch.rand(hidden)))):
        start = time.perf_counter()
        compiled = torch.compile(fn, dynamic=True)
        compiled(*make(2))
        compile_s = time.perf_counter() - start
        for m in (1, 16, 256):
            args = make(m)
            rows_out.append({"op": name, "rows": m, "eager_us": round(per_call(fn, *args), 1),
                             "compiled_us": round(per_call(compiled, *args), 1),
                             "same_bits": torch.equal(fn(*args), compiled(*args)), "compile_s": round(compile_s, 1)})
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="int8", choices=["fp32", "int8", "int8-fast"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=256, help="tokens of the prompt step (0: skip)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile-check", dest="compile_check", action="store_false")
    args = ap.parse_args()

    cache = CacheConfig(num_tokens=max(args.batch) * (args.context + args.steps + 64) + args.prompt + 64)
    eng = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, spec="none", cache=cache))
    if args.prompt > eng.config.scheduler.max_num_batched_tokens:
        sys.exit(f"--prompt {args.prompt} exceeds the step budget {eng.config.scheduler.max_num_batched_tokens}")
    timers = Timers()
    instrument(eng, timers)
    columns = {f"decode b{b}": measure_decode(eng, timers, b, args.context, args.steps) for b in args.batch}
    if args.prompt:
        columns[f"prompt {args.prompt}"] = measure_prompt(eng, timers, args.prompt, 5)
    names = sorted({n for c in columns.values() for n in c}, key=lambda n: (n == "step total", n))
    rows = [{"op": n, **{col: round(c.get(n, 0.0), 2) for col, c in columns.items()}} for n in names]
    print(f"ms per step, {args.dtype}, context {args.context}, threads {torch.get_num_threads()}, "
          f"prompt path {eng.runner.model.prompt_linear_name}")
    print_table(rows, ["op", *columns])
    cfg = eng.model_config
    compiled = compile_check(cfg.hidden_size, cfg.intermediate_size) if args.compile_check else []
    if compiled:
        print("torch.compile against eager, us per call")
        print_table(compiled, ["op", "rows", "eager_us", "compiled_us", "same_bits", "compile_s"])
    write_results({"benchmark": "op_costs", "dtype": args.dtype, "context": args.context, "rows": rows,
                   "torch_compile": compiled}, RESULTS / "op_costs_cpu.json")


if __name__ == "__main__":
    main()
