"""Draft refinement (engine/spec/refine.py): what rescoring a lattice of blind guesses with an n-gram
LM does to acceptance, and to speed, for both drafters that guess blind (BPD's heads, PaSS's
look-ahead rows), side by side in one run.

1. Acceptance, teacher-forced: the default model's greedy outputs of Spec-Bench prompts (generated
   here with `--spec none`) and the held-out self-distilled records (the drafters' and the global
   LM's training data split as `specd train` splits it). At every output position the drafter's rows
   for the row that emits the next token (BPD: its heads; PaSS: the look-ahead rows appended after it)
   give a top-k lattice; each configuration drafts from it as the served drafter does (the request's
   own n-gram LM counted through the text before the emitted token, the emitted token as context),
   and a draft path counts the greedy tokens it gets right in a row (a tree: its best path). Reports
   accepted drafts per step and draft nodes per step.
2. Speed, engine only, batch 1 (none; bpd and pass, unrefined and refined), each prompt alone, ABBA
   over --rounds: output tokens per second against `none`, and whether the outputs equal `none`'s.

    .venv/bin/python benchmarks/refine.py [--per-category 3] [--max-tokens 128] [--dtype fp32] [--drafters bpd pass]

Prints the tables and one JSON line; writes benchmarks/results/refine_cpu.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_spec_bench, print_table, write_results  # noqa: E402
from benchmarks.recycle import add_abba_args, generate, run_abba  # noqa: E402
from engine.config import DEFAULT_MODEL, CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.spec.bpd import head_outputs  # noqa: E402
from engine.spec.refine import ORDER, NgramLM, RefineConfig, best_paths, global_lm  # noqa: E402
from engine.train.artifact import ARTIFACTS_DIR, default_artifact_path, load_artifact  # noqa: E402
from engine.train.frozen import FrozenLlama  # noqa: E402
from engine.train.job import load_training_data  # noqa: E402
from engine.train.pass_ import lookahead_logits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = ARTIFACTS_DIR / "pass" / f"{DEFAULT_MODEL}.data.jsonl"
# label -> (LM weight, paths, global LM): what the teacher-forced part compares
# label -> (LM weight, paths, global LM, LM candidates per row)
ACCEPTANCE_CONFIGS = {
    "unrefined": (0.0, 1, False, 0), "own text, w 1": (1.0, 1, False, 0), "own + global, w 1": (1.0, 1, True, 0),
    "own + global, w 2": (2.0, 1, True, 0), "own + global, w 1, 2 paths": (1.0, 2, True, 0),
    "+ 4 LM candidates, w 1": (1.0, 1, True, 4), "+ 4 LM candidates, w 2": (2.0, 1, True, 4),
    "+ 4 LM candidates, w 3": (3.0, 1, True, 4), "+ 4 LM candidates, w 2, 2 paths": (2.0, 2, True, 4),
    "LM alone (no rows)": (None, 1, True, 4),
}
TOP_K = RefineConfig().top_k
# drafter -> rows per position the teacher-forced part drafts from (bpd: its 2 heads; pass: L = 1 and 2)
LATTICES = {"bpd 2 heads": ("bpd", 2), "pass L 1": ("pass", 1), "pass L 2": ("pass", 2)}
# speed label -> (method, engine flags)
SPEED_CONFIGS = {
    "none": ("none", {}),
    "bpd unrefined": ("bpd", {"refine_weight": 0.0}), "bpd refined": ("bpd", {}),
    "pass unrefined": ("pass", {"refine_weight": 0.0}), "pass refined": ("pass", {}),
    "pass refined, L 2": ("pass", {"pass_lookahead": 2}), "pass refined, fused": ("pass", {"pass_mode": "fused"}),
    "pass refined, branch": ("pass", {"pass_mode": "branch"}),
    "bpd refined, rows' top 4 only": ("bpd", {"refine_lm_candidates": 0}),
    "pass refined, rows' top 4 only": ("pass", {"refine_lm_candidates": 0}),
}


def guess_rows(frozen: FrozenLlama, model_dir: Path, drafter: str, num_rows: int):
    """A function ids -> (greedy next tokens # [T], the drafter's rows' logits # [T, num_rows, vocab]):
    row i of position j guesses token j + 2 + i, as served (raw logits: best_paths needs no softmax)."""
    artifact = load_artifact(default_artifact_path(drafter, DEFAULT_MODEL), drafter, model_dir)

    def rows(ids: list[int]):
        with torch.no_grad():
            prefix = frozen.prefix(ids)
            greedy = frozen.logits(prefix.hidden).argmax(-1)
            if drafter == "bpd":
                heads = (artifact.tensors["weight"][:num_rows].float(), artifact.tensors["bias"][:num_rows].float())
                return greedy, frozen.logits(head_outputs(prefix.hidden, *heads))
            embeds = artifact.tensors["lookahead"][:num_rows].float()
            return greedy, lookahead_logits(frozen, prefix, embeds, torch.arange(len(ids)))
    return rows


def lattice_cases(rows, texts: list[tuple[list[int], int]], num_rows: int) -> list[tuple]:
    """(text before the emitted token, emitted token, the rows' logits # [num_rows, vocab], the
    num_rows greedy tokens after the emitted one) per output position whose emitted token is the
    greedy one."""
    cases = []
    for ids, first in texts:  # first: the row that emits the first output token
        greedy, logits = rows(ids)
        greedy = greedy.tolist()
        for j in range(first, len(ids) - 1 - num_rows):
            if greedy[j] == ids[j + 1]:
                cases.append((ids[:j + 1], ids[j + 1], logits[j], greedy[j + 1:j + 1 + num_rows]))
    return cases


def acceptance(cases: list[tuple], weight: float | None, num_paths: int, base: NgramLM | None, vocab: int,
               lm_candidates: int) -> dict:
    """Accepted drafts per step of the refined lattice; weight None: the LM's own greedy chain alone
    (what an n-gram drafter with the same LM would draft, for comparison)."""
    accepted = nodes = 0
    lm, lm_text = None, None
    for before, emitted, logits, labels in cases:
        if lm_text is None or before[:len(lm_text)] != lm_text:  # a new text: a new request's LM
            lm = NgramLM(vocab, base=base)
        lm.extend(before)
        lm_text = before
        context = before[-(ORDER - 1):] + [emitted]
        if weight is None:
            paths = [_lm_chain(lm, context, len(logits))]
        else:
            paths = best_paths(logits, lm, context, weight, num_paths, TOP_K, lm_candidates)
        accepted += max(_prefix_match(path, labels) for path in paths)
        nodes += len({tuple(path[:i + 1]) for path in paths for i in range(len(path))})
    return {"accepted_per_step": round(accepted / len(cases), 4), "nodes_per_step": round(nodes / len(cases), 3)}


def _lm_chain(lm: NgramLM, context: list[int], length: int) -> list[int]:
    chain: list[int] = []
    for _ in range(length):
        best = lm.candidates(context + chain, 1)
        if not best:
            break
        chain.append(best[0][0])
    return chain


def _prefix_match(path: list[int], labels: list[int]) -> int:
    n = 0
    while n < min(len(path), len(labels)) and path[n] == labels[n]:
        n += 1
    return n


def speed(engines: dict, prompts: list[list[int]], max_tokens: int, rounds: int) -> list[dict]:
    totals, outputs = run_abba(engines, prompts, max_tokens, rounds)
    base = totals["none"]["tokens"] / totals["none"]["seconds"]
    return [{"config": label, "tok_s": round(t["tokens"] / t["seconds"], 2),
             "vs_none": round(t["tokens"] / t["seconds"] / base, 3),
             "drafts_per_step": round(t["drafts"] / max(1, t["steps"]), 3),
             "accepted_per_step": round(t["accepted"] / max(1, t["steps"]), 3),
             "identical_outputs": f"{sum(a == b for a, b in zip(outputs[label], outputs['none']))}/{len(prompts)}"}
            for label, t in totals.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_abba_args(ap)
    ap.add_argument("--drafters", nargs="+", default=["bpd", "pass"], choices=["bpd", "pass"])
    ap.add_argument("--no-speed", action="store_true", help="the teacher-forced part only")
    ap.add_argument("--no-acceptance", action="store_true", help="the speed part only")
    ap.add_argument("--speed-configs", nargs="+", default=None, choices=list(SPEED_CONFIGS),
                    help="the speed part's configurations (default: every one of --drafters; none always runs)")
    ap.add_argument("--out", default=str(RESULTS / "refine_cpu.json"))
    args = ap.parse_args()

    def engine(**kw) -> LLMEngine:
        return LLMEngine(EngineConfig(model=DEFAULT_MODEL, spec="none", dtype=args.dtype,
                                      cache=CacheConfig(num_tokens=16384), **kw))

    speed_configs = {label: c for label, c in SPEED_CONFIGS.items() if c[0] in ["none", *args.drafters]
                     and (args.speed_configs is None or label in ["none", *args.speed_configs])}
    engines = {label: (engine(**flags), method) for label, (method, flags) in speed_configs.items()}
    plain = engines["none"][0]
    prompts = [plain.tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}])
               for r in load_spec_bench(args.per_category)]
    outputs = [generate(plain, p, "none", args.max_tokens, f"tf-{i}")["tokens"] for i, p in enumerate(prompts)]

    data = load_training_data(DEFAULT_MODEL, DATA, eval_fraction=0.1)
    frozen = FrozenLlama(data.model_dir)
    vocab = frozen.config.vocab_size
    sets = {"spec_bench": [(p + o, len(p) - 1) for p, o in zip(prompts, outputs)],
            "held_out_records": [(r.token_ids, len(r.prompt_ids) - 1) for r in data.held_out if r.mode == "greedy"]}
    global_model = global_lm(vocab, [r.token_ids for r in data.train])  # never the held-out records
    rows = []
    for lattice, (drafter, num_rows) in LATTICES.items():
        if drafter not in args.drafters or args.no_acceptance:
            continue
        guesses = guess_rows(frozen, data.model_dir, drafter, num_rows)
        for name, texts in sets.items():
            cases = lattice_cases(guesses, texts, num_rows)
            for label, (weight, paths, use_global, lm_candidates) in ACCEPTANCE_CONFIGS.items():
                rows.append({"lattice": lattice, "text": name, "config": label, "positions": len(cases),
                             **acceptance(cases, weight, paths, global_model if use_global else None, vocab,
                                          lm_candidates)})
    if rows:
        print(f"Lattice rescoring, teacher-forced, {len(prompts)} Spec-Bench outputs ({args.max_tokens} tokens) "
              f"and {len(sets['held_out_records'])} held-out greedy records; top-{TOP_K} per row")
        print_table(rows, list(rows[0]))
    speed_rows = [] if args.no_speed else speed(engines, prompts, args.max_tokens, args.rounds)
    if speed_rows:
        print(f"\nbatch 1, engine only, {args.dtype}, {len(prompts)} prompts x {args.rounds} rounds (ABBA), greedy")
        print_table(speed_rows, list(speed_rows[0]))
    write_results({"benchmark": "refine", "dtype": args.dtype, "prompts": len(prompts),
                   "max_tokens": args.max_tokens, "rounds": args.rounds, "rows": rows, "speed": speed_rows},
                  Path(args.out))


if __name__ == "__main__":
    main()
