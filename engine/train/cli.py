"""`specd train data | pass | bpd | recycle`: argparse only at import time (the server imports this without torch)."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from engine.config import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("specd.train")


def default_spec_bench_dir() -> Path:
    """Where the Spec-Bench prompts live (as benchmarks/common.py finds them); the committed
    excerpt when the full set is not on this machine."""
    full = Path(os.environ.get("SPECD_BENCH_DATA") or REPO.parent / "shared" / "data")
    return full if (full / "spec_bench_question.jsonl").is_file() else REPO / "tests" / "data"


def add_train_parser(sub) -> None:
    from engine.train.config import DataConfig, TrainConfig

    train = sub.add_parser("train", help="drafter training: self-distillation data, PaSS embeddings, BPD heads, recycle module")
    tsub = train.add_subparsers(dest="train_command", required=True)
    dc, tc = DataConfig(), TrainConfig()

    d = tsub.add_parser("data", help="the model's own continuations of offline prompts (resumable JSONL)")
    d.add_argument("--model", default=DEFAULT_MODEL)
    d.add_argument("--out", required=True, help="JSONL file (appended to, so a rerun resumes)")
    d.add_argument("--num-prompts", type=int, default=dc.num_prompts)
    d.add_argument("--max-tokens", type=int, default=dc.max_tokens)
    d.add_argument("--max-prompt-tokens", type=int, default=dc.max_prompt_tokens)
    d.add_argument("--sample-fraction", type=float, default=dc.sample_fraction)
    d.add_argument("--temperature", type=float, default=dc.temperature)
    d.add_argument("--batch", type=int, default=dc.batch, help="requests in flight")
    d.add_argument("--seed", type=int, default=dc.seed)
    d.add_argument("--hidden-states", action="store_true", help="also save final hidden states per record")
    d.add_argument("--spec-bench-dir", default=None, help="Spec-Bench data the prompts must be disjoint from")
    d.add_argument("--num-threads", type=int, default=None)

    p = _drafter_parser(tsub, "pass", "PaSS look-ahead embeddings", lr=tc.lr)
    p.add_argument("--num-lookahead", type=int, default=4, help="L, the number of look-ahead embeddings")
    p.add_argument("--steps", type=int, default=tc.steps)
    p.add_argument("--roots-per-example", type=int, default=48, help="split points per sequence per step")

    b = _drafter_parser(tsub, "bpd", "Blockwise Parallel Decoding heads", lr=3e-3)
    b.add_argument("--num-heads", type=int, default=2, help="K, the tokens the heads guess past the next one")
    b.add_argument("--epochs", type=int, default=5, help="passes over the training records (one per step)")

    r = _drafter_parser(tsub, "recycle", "RecycleGPT's recyclable module", lr=1e-3)
    r.add_argument("--depth", type=int, default=2, help="module rounds trained unrolled (drafts per step)")
    r.add_argument("--vocab-size", type=int, default=16384, help="tokens in the draft vocabulary")
    r.add_argument("--ffn-size", type=int, default=1536, help="the module's inner width")
    r.add_argument("--epochs", type=int, default=10, help="passes over the training records (one per step)")


def _drafter_parser(tsub, method: str, what: str, lr: float) -> argparse.ArgumentParser:
    """A drafter's training subcommand with the options every drafter's training shares."""
    from engine.train.config import TrainConfig

    tc = TrainConfig()
    p = tsub.add_parser(method, help=f"train {what} on a data file")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default=None, help=f"artifact path (default artifacts/{method}/<model>.safetensors)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=tc.warmup_steps)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=tc.eval_every)
    p.add_argument("--seed", type=int, default=tc.seed)
    p.add_argument("--checkpoint", default=None, help="resumable checkpoint file")
    p.add_argument("--num-threads", type=int, default=None)
    return p


def run_train(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    command = "specd " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.train_command == "data":
            return _data(args, command)
        if args.train_command == "bpd":
            return _bpd(args, command)
        if args.train_command == "recycle":
            return _recycle(args, command)
        return _pass(args, command)
    except (ValueError, FileNotFoundError) as exc:
        print(f"specd train {args.train_command}: {exc}", file=sys.stderr)
        return 2


def _data(args, command: str) -> int:
    from engine.train.config import DataConfig
    from engine.train.data import generate_data

    config = DataConfig(num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, sample_fraction=args.sample_fraction,
                        temperature=args.temperature, seed=args.seed, batch=args.batch)
    spec_bench = Path(args.spec_bench_dir) if args.spec_bench_dir else default_spec_bench_dir()
    if not (spec_bench / "spec_bench_question.jsonl").is_file():
        log.warning("full Spec-Bench data not found; prompts are checked against %s only", spec_bench)
    n = generate_data(args.model, args.out, config, spec_bench, args.hidden_states, command)
    print(f"{n} records in {args.out}")
    return 0


def _pass(args, command: str) -> int:
    from engine.train.pass_ import train_pass

    out = _artifact_path(args)
    header = train_pass(args.model, args.data, out, args.num_lookahead, _train_config(args, steps=args.steps),
                        args.roots_per_example, args.eval_fraction, args.checkpoint, command)
    return _report(out, header)


def _bpd(args, command: str) -> int:
    from engine.train.bpd import train_bpd

    out = _artifact_path(args)
    header = train_bpd(args.model, args.data, out, args.num_heads, args.epochs, _train_config(args),
                       args.eval_fraction, args.checkpoint, command)
    return _report(out, header)


def _recycle(args, command: str) -> int:
    from engine.train.recycle import train_recycle

    out = _artifact_path(args)
    header = train_recycle(args.model, args.data, out, args.depth, args.vocab_size, args.ffn_size, args.epochs,
                           _train_config(args), args.eval_fraction, args.checkpoint, command)
    return _report(out, header)


def _artifact_path(args) -> Path:
    from engine.train.artifact import default_artifact_path

    return Path(args.out) if args.out else default_artifact_path(args.train_command, args.model)


def _train_config(args, **extra):
    from engine.train.config import TrainConfig

    return TrainConfig(lr=args.lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every, seed=args.seed, **extra)


def _report(out: Path, header: dict) -> int:
    print(f"wrote {out}: held-out eval untrained {header['eval']['untrained']}, trained {header['eval']['trained']}")
    return 0
