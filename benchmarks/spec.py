"""Speculation benchmark: none / ngram / jacobi / pass x concurrency x layout, one run.

Layouts: ragged (EMS-SD), padded (inputs padded to the batch's longest draft) and padded-kv (EMS-SD's
vanilla baseline: padded inputs and a padded KV cache); a line per padded layout gives ragged's
throughput over it per method and concurrency.

Spec-Bench first-turn prompts (N per category) plus code-editing prompts (a Python standard-library
function and a request to rewrite it: the case prompt lookup is made for), greedy, chat-templated.
Each method is chosen per request (`speculative.method`) on one server per layout, so every ratio
is measured side by side. Prints a table (tok/s, speedup over `none` at the same concurrency,
mean acceptance length, per category; latency percentiles overall) and one JSON line, and writes
the JSON to --out with PNG charts beside it (speedup by concurrency per method, latency percentiles).

    .venv/bin/python benchmarks/spec.py [--per-category 10] [--concurrency 1 4 8 16] [--max-tokens 128]
                                        [--workload mixed|per-category] [--request-rates 0.5 0.7]

`--request-rates` adds open-loop loads: the mixed prompts, shuffled, arrive as a Poisson process of
that many requests per second (the same schedule for every method), as real traffic does; their rows
have a `rate` instead of a `concurrency`, and every tok/s there (overall too) is the requests' own
rate: output tokens over their summed end-to-end time. In the closed loops (`--concurrency`), a
method that finishes some requests sooner brings the next prompts sooner, so the other requests in
flight share more prefill; an open loop offers every method the same load.

PaSS variants (`--pass-variants trained:two_call untrained:fused ...`): look-ahead embeddings and
mode are server settings, so each variant gets its own ragged server and its rows are labelled
`pass[<embeddings>,<mode>]`; `pass` alone is the server default (the committed trained artifact,
the default mode). `untrained` = every embedding the model's mean token embedding (the trainer's
starting point). Each variant server measures `none` and `pass` side by side in ABBA order and its
speedups are over its own `none`; the other rows' are over `none` on the main ragged server.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Server, latency_summary, load_spec_bench, print_table, run_arrivals,  # noqa: E402
                               run_load, write_results)

METHODS = ("none", "ngram", "jacobi", "pass")
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
    return summarize(timings, wall, layout=layout, method=method, concurrency=concurrency, server="main")


def measure_open_loop(server: Server, prompts, method: str, rate: float, max_tokens: int, layout: str) -> list[dict]:
    extra = {"speculative": {"method": method}}
    shuffled = random.Random(0).sample(prompts, len(prompts))  # categories interleaved, the same for every method
    timings, wall = asyncio.run(run_arrivals(server.url, shuffled, rate, max_tokens, extra))
    return summarize(timings, wall, layout=layout, method=method, concurrency=None, rate=rate, server="main")


def measure_per_category(server: Server, prompts, method: str, concurrency: int, max_tokens: int,
                         layout: str) -> list[dict]:
    """Each category as its own load, its prompts repeated up to 2 x concurrency requests, so its rate
    is its own: in the mixed load a category's e2e rate also counts the other clients' prompts, which
    arrive sooner when speculation finishes those clients sooner. A category's tok/s is its load's
    throughput; 'all' is every load's tokens over their summed wall time."""
    extra = {"speculative": {"method": method}}
    labels = {"layout": layout, "method": method, "concurrency": concurrency, "server": "main"}
    rows, everything, walls = [], [], 0.0
    for category in sorted({p["category"] for p in prompts}):
        mine = [p for p in prompts if p["category"] == category]
        load = (mine * -(-2 * concurrency // len(mine)))[: max(len(mine), 2 * concurrency)]
        timings, wall = asyncio.run(run_load(server.url, load, concurrency, max_tokens, extra))
        everything, walls = everything + timings, walls + wall
        rows.append({**summarize(timings, wall, **labels)[0], "category": category})
    return summarize(everything, walls, **labels)[:1] + rows


def measure_side_by_side(server: Server, prompts, concurrency: int, max_tokens: int, label: str) -> list[dict]:
    """`none` and `pass` on one server in ABBA order (none, pass, pass, none), so the drifting load
    of a shared machine weighs on both alike; each method's rows pool its two rounds."""
    runs = {"none": ([], 0.0), "pass": ([], 0.0)}
    for method in ("none", "pass", "pass", "none"):
        extra = {"speculative": {"method": method}}
        timings, wall = asyncio.run(run_load(server.url, prompts, concurrency, max_tokens, extra))
        runs[method] = (runs[method][0] + timings, runs[method][1] + wall)
    return [row for method, (timings, wall) in runs.items()
            for row in summarize(timings, wall, layout="ragged", method=label if method == "pass" else "none",
                                 concurrency=concurrency, server=label)]


def summarize(timings, wall: float, **labels) -> list[dict]:
    """Rows per category ("all" first): tok/s, mean acceptance length, latency percentiles."""
    rows = []
    by_cat = defaultdict(list)
    for t in timings:
        by_cat[t.category].append(t)
    for category, ts in [("all", timings)] + sorted(by_cat.items()):
        tokens = sum(t.num_output_tokens for t in ts)
        spec = [t.usage.get("speculative") or {} for t in ts]
        steps = sum(s.get("steps", 0) for s in spec)
        accepted = sum(s.get("accepted_tokens", 0) for s in spec)
        own_rate = tokens / sum(t.e2e for t in ts)
        closed_loop = labels["concurrency"] is not None
        rows.append({
            **labels, "category": category,
            # Closed loop: "all" is aggregate throughput over the wall time, a category's is its requests'
            # own rate x the clients. Open loop (a request rate): the requests' own rate throughout.
            "tok_s": tokens / wall if category == "all" and closed_loop else own_rate * (labels["concurrency"] or 1),
            "mean_accept_len": (steps + accepted) / steps if steps else 0.0,
            "requests": len(ts),
            **(latency_summary(ts) if category == "all" else {}),
        })
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Over `none` on the same server (PaSS variants measure their own) at the same concurrency or
    request rate."""
    base = {(r["server"], r["concurrency"], r.get("rate"), r["category"]): r["tok_s"]
            for r in rows if r["method"] == "none" and r["layout"] == "ragged"}
    for r in rows:
        ref = base.get((r["server"], r["concurrency"], r.get("rate"), r["category"]))
        r["speedup"] = r["tok_s"] / ref if ref else float("nan")


def layout_ratios(rows: list[dict]) -> list[dict]:
    """Ragged throughput over each padded layout's, per method and concurrency (all categories; closed loops)."""
    ragged = {(r["method"], r["concurrency"]): r["tok_s"] for r in rows
              if r["layout"] == "ragged" and r["category"] == "all" and r["server"] == "main"
              and r["concurrency"] is not None}
    return [{"layout": r["layout"], "method": r["method"], "concurrency": r["concurrency"],
             "ratio": ragged[(r["method"], r["concurrency"])] / r["tok_s"]}
            for r in rows if r["layout"] != "ragged" and r["category"] == "all"
            and (r["method"], r["concurrency"]) in ragged]


def pass_variant_servers(variants: list[str], server_args: list[str], tmp: Path):
    """(label, serve flags) per `embeddings:mode[:L]` variant; embeddings = trained | untrained | a path,
    L (optional) sets the look-ahead rows (--pass-lookahead)."""
    from engine.spec.lookahead import default_artifact_path
    from engine.train.pass_ import write_untrained_artifact

    trained = default_artifact_path("SmolLM2-135M-Instruct")
    for variant in variants:
        embeddings, mode, *cap = variant.split(":")
        if embeddings == "trained":
            path = trained
        elif embeddings == "untrained":
            path = write_untrained_artifact("SmolLM2-135M-Instruct", tmp / "untrained.safetensors", like=trained)
        else:
            path = Path(embeddings)
        flags = ["--pass-artifact", str(path), "--pass-mode", mode, *server_args]
        yield f"pass[{','.join([embeddings, mode, *cap])}]", flags + (["--pass-lookahead", cap[0]] if cap else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--layouts", nargs="*", default=["ragged", "padded", "padded-kv"],
                    help="main servers (none: PaSS variants only)")
    ap.add_argument("--server-args", default="", help="extra `specd serve` flags, quoted")
    ap.add_argument("--pass-variants", nargs="*", default=[],
                    help="extra PaSS servers, EMBEDDINGS:MODE[:L] (trained|untrained|PATH : fused|two_call : L)")
    ap.add_argument("--request-rates", type=float, nargs="*", default=[],
                    help="open-loop loads too: mixed prompts arriving as a Poisson process of R requests/s")
    ap.add_argument("--workload", choices=["mixed", "per-category"], default="mixed",
                    help="mixed: every category in one load; per-category: each category alone (measure_per_category)")
    ap.add_argument("--out", type=Path, default=RESULTS / "spec.json", help="result JSON; PNG charts go beside it")
    args = ap.parse_args()

    prompts = load_spec_bench(args.per_category) + code_edit_prompts(args.per_category)
    rows = []
    for layout in args.layouts:
        with Server("--spec-layout", layout, "--kv-cache-tokens", "32768", *args.server_args.split()) as server:
            asyncio.run(run_load(server.url, prompts[:2], 1, 8))  # warm-up
            for concurrency in args.concurrency:
                for method in args.methods:
                    if layout != "ragged" and (method == "none" or concurrency == 1):
                        continue  # no drafts, or no other request: nothing to pad
                    run = measure_per_category if args.workload == "per-category" else measure
                    rows += run(server, prompts, method, concurrency, args.max_tokens, layout)
            for rate in args.request_rates:
                for method in args.methods:
                    if layout == "ragged" or method != "none":
                        rows += measure_open_loop(server, prompts, method, rate, args.max_tokens, layout)
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in pass_variant_servers(args.pass_variants, args.server_args.split(), Path(tmp)):
            with Server("--kv-cache-tokens", "32768", *flags) as server:
                asyncio.run(run_load(server.url, prompts[:2], 1, 8))  # warm-up
                for concurrency in args.concurrency:
                    rows += measure_side_by_side(server, prompts, concurrency, args.max_tokens, label)
    add_speedups(rows)
    print_table(rows, ["server", "layout", "method", "concurrency", "rate", "category", "tok_s", "speedup",
                       "mean_accept_len", "requests"])
    ratios = layout_ratios(rows)
    for r in ratios:
        print(f"ragged / {r['layout']}: {r['method']} at {r['concurrency']} clients {r['ratio']:.3f}")
    write_results({"benchmark": "spec", "prompts": len(prompts), "max_tokens": args.max_tokens,
                   "workload": args.workload, "request_rates": args.request_rates, "rows": rows,
                   "layout_ratios": ratios},
                  args.out)


if __name__ == "__main__":
    main()
