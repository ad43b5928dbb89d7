"""Speculation benchmark: none / ngram / jacobi x concurrency x layout (ragged / padded), one run.

Spec-Bench first-turn prompts (N per category) plus code-editing prompts (a Python standard-library
function and a request to rewrite it: the case prompt lookup is made for), greedy, chat-templated.
Each method is chosen per request (`speculative.method`) on one server per layout, so every ratio
is measured side by side. Prints a table (tok/s, speedup over `none` at the same concurrency,
mean acceptance length, per category; latency percentiles overall) and one JSON line, and writes
the JSON to --out with PNG charts beside it (speedup by concurrency per method, latency percentiles).

    .venv/bin/python benchmarks/spec.py [--per-category 10] [--concurrency 1 4 8 16] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Server, latency_summary, load_spec_bench, print_table, run_load,  # noqa: E402
                               write_results)

METHODS = ("none", "ngram", "jacobi")
RESULTS = Path(__file__).resolve().parent / "results"


def code_edit_prompts(count: int) -> list[dict]:
    import json as json_mod
    import string
    import textwrap

    funcs = [textwrap.indent, textwrap.dedent, textwrap.shorten, json_mod.dump, string.capwords,
             textwrap.wrap, json_mod.loads, textwrap.fill, json_mod.load, string.Formatter.vformat]
    prompts = []
    for fn in funcs[:count]:
        src = inspect.getsource(fn)[:1800]
        prompts.append({"category": "code_edit", "id": fn.__qualname__,
                        "prompt": f"Rewrite this Python function with type hints, keeping its behaviour:\n\n{src}"})
    return prompts


def measure(server: Server, prompts, method: str, concurrency: int, max_tokens: int, layout: str) -> list[dict]:
    extra = {"speculative": {"method": method}}
    timings, wall = asyncio.run(run_load(server.url, prompts, concurrency, max_tokens, extra))
    rows = []
    by_cat = defaultdict(list)
    for t in timings:
        by_cat[t.category].append(t)
    for category, ts in [("all", timings)] + sorted(by_cat.items()):
        tokens = sum(t.num_output_tokens for t in ts)
        spec = [t.usage.get("speculative") or {} for t in ts]
        steps = sum(s.get("steps", 0) for s in spec)
        accepted = sum(s.get("accepted_tokens", 0) for s in spec)
        rows.append({
            "layout": layout, "method": method, "concurrency": concurrency, "category": category,
            # "all" is aggregate throughput over the wall time; a category's is its requests' own rate.
            "tok_s": tokens / wall if category == "all" else tokens / sum(t.e2e for t in ts) * concurrency,
            "mean_accept_len": (steps + accepted) / steps if steps else 0.0,
            "requests": len(ts),
            **(latency_summary(ts) if category == "all" else {}),
        })
    return rows


def add_speedups(rows: list[dict]) -> None:
    base = {(r["concurrency"], r["category"]): r["tok_s"]
            for r in rows if r["method"] == "none" and r["layout"] == "ragged"}
    for r in rows:
        ref = base.get((r["concurrency"], r["category"]))
        r["speedup"] = r["tok_s"] / ref if ref else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--layouts", nargs="+", default=["ragged", "padded"])
    ap.add_argument("--server-args", default="", help="extra `specd serve` flags, quoted")
    ap.add_argument("--out", type=Path, default=RESULTS / "spec.json", help="result JSON; PNG charts go beside it")
    args = ap.parse_args()

    prompts = load_spec_bench(args.per_category) + code_edit_prompts(args.per_category)
    rows = []
    for layout in args.layouts:
        with Server("--spec-layout", layout, "--kv-cache-tokens", "32768", *args.server_args.split()) as server:
            asyncio.run(run_load(server.url, prompts[:2], 1, 8))  # warm-up
            for concurrency in args.concurrency:
                for method in args.methods:
                    if layout == "padded" and method == "none":
                        continue  # no drafts, nothing to pad
                    rows += measure(server, prompts, method, concurrency, args.max_tokens, layout)
    add_speedups(rows)
    print_table(rows, ["layout", "method", "concurrency", "category", "tok_s", "speedup", "mean_accept_len",
                       "requests"])
    write_results({"benchmark": "spec", "prompts": len(prompts), "max_tokens": args.max_tokens, "rows": rows},
                  args.out)


if __name__ == "__main__":
    main()
