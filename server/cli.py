"""`specd serve` and `specd download-default`.

serve: builds an EngineConfig from the flags, an engine factory that imports engine.engine (and
torch) only inside the engine thread, and runs uvicorn. SIGTERM/SIGINT: new requests get 503 at
once (the client drains), uvicorn stops accepting connections and waits for in-flight responses
(--drain-timeout), then the engine thread stops.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.config import (DEFAULT_MODEL, DTYPES, KV_CACHE_DTYPES, PASS_MODES, SPEC_LAYOUTS, SPEC_METHODS, CacheConfig,
                           EngineConfig, SchedulerConfig)
from engine.train.cli import add_train_parser, run_train
from server.hugepages import reexec_with_hugepages
from server.logs import LOG_FORMATS, EngineStatsLogger, configure_logging

log = logging.getLogger("specd")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_spec_args(p)
    _add_drafter_args(p)
    _add_server_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, its batch and its KV cache."""
    d_cache, d_sched = CacheConfig(), SchedulerConfig()
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (default) or a local HF model directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-num-seqs", type=int, default=d_sched.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d_sched.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=d_sched.max_model_len)
    p.add_argument("--max-queue", type=int, default=d_sched.max_queue,
                   help="waiting requests beyond which new ones get 429")
    p.add_argument("--kv-cache-tokens", type=int, default=d_cache.num_tokens)
    p.add_argument("--block-size", type=int, default=d_cache.block_size)
    p.add_argument("--kv-cache-dtype", default=d_cache.dtype, choices=list(KV_CACHE_DTYPES),
                   help="auto: fp16 for the int8 dtypes on a CPU with F16C, else the activations' dtype")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="where the default model is cached")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    """Speculation for every method: which, how many drafts, the layout and the draft controller."""
    p.add_argument("--spec", default=EngineConfig.spec, choices=list(SPEC_METHODS),
                   help="speculation method for requests that don't pick one (none: plain decoding)")
    p.add_argument("--num-draft-tokens", type=int, default=EngineConfig.num_draft_tokens,
                   help="most drafts per request per step (the cost controller may use fewer)")
    p.add_argument("--ngram-cutoff", type=float, default=EngineConfig.ngram_cutoff,
                   help="prompt lookup drafts a copied token only while its measured chance of acceptance is at "
                        "least this (0: always the full copy)")
    p.add_argument("--spec-layout", default="ragged", choices=list(SPEC_LAYOUTS),
                   help="padded (inputs) and padded-kv (inputs and KV cache: EMS-SD's vanilla baseline), for "
                        "benchmarks")
    p.add_argument("--no-spec-adaptive", action="store_true",
                   help="verify every proposed draft instead of letting measured costs cut them")
    p.add_argument("--spec-fairness", type=float, default=EngineConfig.spec_fairness,
                   help="least expected rate, over plain decoding, a draft plan may leave any request (0: "
                        "maximise batch throughput)")


def _add_drafter_args(p: argparse.ArgumentParser) -> None:
    """Each drafter's own settings and trained artifacts."""
    p.add_argument("--jacobi-config", default=None, help="YAML with the TR-Jacobi tree shape")
    p.add_argument("--pass-artifact", default=None,
                   help="PaSS look-ahead embeddings (default: artifacts/pass/<model>.safetensors if present)")
    p.add_argument("--pass-mode", default=EngineConfig.pass_mode, choices=list(PASS_MODES),
                   help="two_call: the paper's draft then verify; fused / branch: look-ahead rows ride in the "
                        "verify pass, after the drafts / beside them")
    p.add_argument("--pass-lookahead", type=int, default=EngineConfig.pass_lookahead,
                   help="PaSS look-ahead rows per step (at most the artifact's L)")
    p.add_argument("--bpd-artifact", default=None,
                   help="Blockwise Parallel Decoding heads (default: artifacts/bpd/<model>.safetensors if present)")
    p.add_argument("--refine-weight", type=float, default=EngineConfig.refine_weight,
                   help="bpd and pass: weight of the n-gram LM that rescores the drafts' top-k lattice "
                        "(0: the heads' and look-ahead rows' argmax)")
    p.add_argument("--refine-lm-candidates", type=int, default=EngineConfig.refine_lm_candidates,
                   help="bpd and pass: the n-gram LM's likeliest next tokens each lattice row offers beside "
                        "its own top 4 (0: the rows' top 4 alone)")
    p.add_argument("--refine-paths", type=int, default=EngineConfig.refine_paths,
                   help="bpd: best lattice paths drafted as a tree (1: a chain)")
    p.add_argument("--refine-ngram-data", default=None,
                   help="self-distilled records for the refinement's global n-gram LM (default: "
                        "artifacts/pass/<model>.data.jsonl if present; '': the request's own text alone)")
    p.add_argument("--recycle-artifact", default=None,
                   help="RecycleGPT's recyclable module (default: artifacts/recycle/<model>.safetensors if present)")
    p.add_argument("--recycle-lossy", action="store_true",
                   help="recycle: keep one module token per step unverified (the paper's alternating decoding; "
                        "faster, NOT lossless)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """HTTP, security, shutdown and logging."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SPECD_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on API routes (default $SPECD_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=list(LOG_FORMATS),
                   help="json: one JSON object per line, for log shippers")
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between engine log lines (throughput, queue, acceptance, speedup); 0 = off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd", description="OpenAI-compatible server with speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_args(sub.add_parser("serve", help="run the HTTP server"))
    dl = sub.add_parser("download-default", help=f"prepare the cached {DEFAULT_MODEL} (dequantize once)")
    dl.add_argument("--cache-dir", default=None)
    add_train_parser(sub)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, spec=args.spec, cache_dir=args.cache_dir,
        num_threads=args.num_threads, num_draft_tokens=args.num_draft_tokens,
        ngram_cutoff=args.ngram_cutoff, spec_layout=args.spec_layout,
        spec_adaptive=not args.no_spec_adaptive, spec_fairness=args.spec_fairness, jacobi_config=args.jacobi_config,
        pass_artifact=args.pass_artifact, pass_mode=args.pass_mode, pass_lookahead=args.pass_lookahead,
        bpd_artifact=args.bpd_artifact, refine_weight=args.refine_weight, refine_paths=args.refine_paths,
        refine_lm_candidates=args.refine_lm_candidates,
        refine_ngram_data=args.refine_ngram_data, recycle_artifact=args.recycle_artifact,
        recycle_lossy=args.recycle_lossy,
        cache=CacheConfig(block_size=args.block_size, num_tokens=args.kv_cache_tokens, dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len, max_queue=args.max_queue),
    )


def make_engine_factory(config: EngineConfig):
    def factory():
        from engine.engine import LLMEngine  # torch is imported here, in the engine thread only

        return LLMEngine(config)
    return factory


def make_exporter():
    try:
        from engine.metrics import PrometheusExporter
    except ImportError:
        log.warning("engine.metrics is unavailable; /metrics shows the default registry only")
        return None
    return PrometheusExporter()


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import build_app
    from server.engine_client import EngineClient

    try:
        config = engine_config(args)
    except ValueError as exc:
        print(f"specd serve: {exc}", file=sys.stderr)
        return 2

    def on_load_error(exc: BaseException) -> None:
        # The model cannot load: stop uvicorn (gracefully) and exit 1 below.
        server.should_exit = True

    client = EngineClient(make_engine_factory(config), exporter=make_exporter(), on_load_error=on_load_error,
                          stats_logger=EngineStatsLogger(interval=args.log_interval))
    app = build_app(client, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                    drain_timeout=args.drain_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            client.begin_drain()  # requests arriving from now on get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    # log_config=None: uvicorn's records go through the handler configure_logging installed (text or json)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                               timeout_graceful_shutdown=int(args.drain_timeout), access_log=False)
    server = Server(uv_config)
    server.run()
    if client.load_error is not None:
        print(f"specd serve: the model failed to load: {client.load_error}", file=sys.stderr)
        return 1
    return 0


def download_default(args: argparse.Namespace) -> int:
    from engine.models.loader import resolve_model_dir

    path = resolve_model_dir(DEFAULT_MODEL, args.cache_dir)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ("serve", "train"):
        reexec_with_hugepages()  # before torch allocates anything (server/hugepages.py)
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if args.command == "serve":
        return serve(args)
    if args.command == "train":
        return run_train(args, argv)
    return download_default(args)


if __name__ == "__main__":
    sys.exit(main())
