"""Speculation benchmark: none / ngram / jacobi / pass / bpd x concurrency x layout, one run.

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
                                        [--order shuffled|file] [--rounds 2]

Every load sends the prompts in one order, shuffled by default (categories interleaved, as real traffic
comes; the same order for every method). In Spec-Bench's file order MT-bench's ten prompts are a closed
loop's whole first wave: at 16 clients (fp32) its requests then shared their lifetime with the prefills
of the prompts that translation's sped-up requests let in, and measured 0.81-0.83x `none` where two
shuffled orders gave 0.95-1.03x (session 19, benchmarks/results/spec_cpu.txt).

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
from engine.config import TRAINED_METHODS  # noqa: E402  (no padded layout: the server refuses them there)

METHODS = ("none", "ngram", "jacobi", "pass", "bpd", "recycle")
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


def measure_rounds(server: Server, prompts, methods: list[str], concurrency: int, max_tokens: int,
                   rounds: int) -> dict[str, tuple[list, float]]:
    """Each method's closed loop `rounds` times, every other round in reverse order (ABBA for two
    methods and two rounds), pooled: method -> (timings, summed wall time). The drifting load of a
    shared machine then weighs on every method alike, and so does chance in which prompts share a
    step, which moved one category's rate by up to 6% between two runs of the same method."""
    pooled = {method: ([], 0.0) for method in methods}
    for i in range(rounds):
        for method in methods if i % 2 == 0 else methods[::-1]:
            extra = {"speculative": {"method": method}}
            timings, wall = asyncio.run(run_load(server.url, prompts, concurrency, max_tokens, extra))
            pooled[method] = (pooled[method][0] + timings, pooled[method][1] + wall)
    return pooled


def measure(server: Server, prompts, methods: list[str], concurrency: int, max_tokens: int, layout: str,
            rounds: int = 1) -> list[dict]:
    pooled = measure_rounds(server, prompts, methods, concurrency, max_tokens, rounds)
    return [row for method, (timings, wall) in pooled.items()
            for row in summarize(timings, wall, layout=layout, method=method, concurrency=concurrency, server="main")]


def measure_open_loop(server: Server, prompts, method: str, rate: float, max_tokens: int, layout: str) -> list[dict]:
    extra = {"speculative": {"method": method}}
    timings, wall = asyncio.run(run_arrivals(server.url, prompts, rate, max_tokens, extra))
    return summarize(timings, wall, layout=layout, method=method, concurrency=None, rate=rate, server="main")


def measure_per_category(server: Server, prompts, methods: list[str], concurrency: int, max_tokens: int,
                         layout: str, rounds: int = 1) -> list[dict]:
    """Each category as its own load, its prompts repeated up to 2 x concurrency requests, so its rate
    is its own: in the mixed load a category's e2e rate also counts the other clients' prompts, which
    arrive sooner when speculation finishes those clients sooner. A category's tok/s is its load's
    throughput; 'all' is every load's tokens over their summed wall time."""
    everything = {method: ([], 0.0) for method in methods}
    rows = []
    for category in sorted({p["category"] for p in prompts}):
        mine = [p for p in prompts if p["category"] == category]
        load = (mine * -(-2 * concurrency // len(mine)))[: max(len(mine), 2 * concurrency)]
        for method, (timings, wall) in measure_rounds(server, load, methods, concurrency, max_tokens, rounds).items():
            labels = {"layout": layout, "method": method, "concurrency": concurrency, "server": "main"}
            rows.append({**summarize(timings, wall, **labels)[0], "category": category})
            everything[method] = (everything[method][0] + timings, everything[method][1] + wall)
    overall = [summarize(timings, wall, layout=layout, method=method, concurrency=concurrency, server="main")[0]
               for method, (timings, wall) in everything.items()]
    return overall + rows


def measure_side_by_side(server: Server, prompts, concurrency: int, max_tokens: int, label: str) -> list[dict]:
    """`none` and `pass` on one server in ABBA order (none, pass, pass, none), so the drifting load
    of a shared machine weighs on both alike; each method's rows pool its two rounds."""
    runs = measure_rounds(server, prompts, ["none", "pass"], concurrency, max_tokens, rounds=2)
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
    from engine.train.artifact import default_artifact_path
    from engine.train.pass_ import write_untrained_artifact

    trained = default_artifact_path("pass", "SmolLM2-135M-Instruct")
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
                    help="extra PaSS servers, EMBEDDINGS:MODE[:L] (trained|untrained|PATH : fused|two_call|branch : L)")
    ap.add_argument("--request-rates", type=float, nargs="*", default=[],
                    help="open-loop loads too: mixed prompts arriving as a Poisson process of R requests/s")
    ap.add_argument("--workload", choices=["mixed", "per-category"], default="mixed",
                    help="mixed: every category in one load; per-category: each category alone (measure_per_category)")
    ap.add_argument("--order", choices=["shuffled", "file"], default="shuffled",
                    help="the prompts' order in every load: shuffled (categories interleaved, as real traffic "
                         "comes) or file (Spec-Bench's order: MT-bench's prompts are the closed loops' first wave)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="closed loops: each method this many times, every other round in reverse order, pooled")
    ap.add_argument("--out", type=Path, default=RESULTS / "spec.json", help="result JSON; PNG charts go beside it")
    args = ap.parse_args()

    prompts = load_spec_bench(args.per_category) + code_edit_prompts(args.per_category)
    if args.order == "shuffled":
        prompts = random.Random(0).sample(prompts, len(prompts))  # the same order for every method
    rows = []
    for layout in args.layouts:
        with Server("--spec-layout", layout, "--kv-cache-tokens", "32768", *args.server_args.split()) as server:
            asyncio.run(run_load(server.url, prompts[:2], 1, 8))  # warm-up
            for concurrency in args.concurrency:
                # padded layouts: no drafts (none) or no other request (1 client) leave nothing to pad
                methods = [m for m in args.methods if layout == "ragged"
                           or (m != "none" and m not in TRAINED_METHODS and concurrency > 1)]
                if methods:
                    run = measure_per_category if args.workload == "per-category" else measure
                    rows += run(server, prompts, methods, concurrency, args.max_tokens, layout, args.rounds)
            for rate in args.request_rates:
                for method in args.methods:
                    if layout == "ragged" or (method != "none" and method not in TRAINED_METHODS):
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
                   "workload": args.workload, "order": args.order, "rounds": args.rounds,
                   "request_rates": args.request_rates, "rows": rows,
                   "layout_ratios": ratios},
                  args.out)


if __name__ == "__main__":
    main()
