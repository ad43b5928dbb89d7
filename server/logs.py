"""Logging: `--log-format text|json`, one line per finished request, a periodic engine line.

Both lines carry their figures as structured fields (`record.fields`): the text formatter appends
them as `key=value`, the JSON formatter as top-level keys, so a log shipper (Loki, Fluent Bit,
Elasticsearch) indexes `request_id`, `latency_s`, `acceptance` ... without parsing prose.

- `specd.request`: one line per finished engine request (one per choice: n=2 gives two lines), with
  its id, finish reason, prompt/output tokens, speculation method, drafted/accepted tokens,
  acceptance rate, mean acceptance length, queue time, TTFT and end-to-end latency.
- `specd.engine`: every `--log-interval` seconds while there is work: generation and prompt
  throughput, running/waiting requests, KV cache usage, acceptance rate, mean acceptance length and
  the step-time-weighted mean of the live speedup over the interval.

Both loggers are fed from the engine thread (EngineClient) and never touch the event loop.
This module imports no torch.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from engine.types import EngineRequest, RequestOutput, StepStats

LOG_FORMATS = ("text", "json")
request_log = logging.getLogger("specd.request")
engine_log = logging.getLogger("specd.engine")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not user fields (everything else set via `extra=` is one).
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "fields",
                                                                         "color_message"}  # uvicorn's ANSI copy


def _fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class TextFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,000 INFO specd.request: request finished request_id=... latency_s=0.52`."""

    def __init__(self):
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            pairs = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None)
            head, sep, tail = line.partition("\n")  # keep a traceback below the fields
            line = f"{head} {pairs}{sep}{tail}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in (getattr(record, "fields", None) or {}).items() if v is not None})
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", log_format: str = "text", stream=None) -> logging.Handler:
    """Route every logger (specd's, uvicorn's, libraries') through one handler on the root logger."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; choose from {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()  # uvicorn's own config is skipped (log_config=None); theirs would duplicate
        lg.propagate = True
    return handler


# ---------------------------------------------------------------- per-request line


@dataclass
class _Pending:
    arrival_time: float
    method: str
    first_token_time: float | None = None
    first_scheduled_time: float | None = None


class RequestLogger:
    """Remembers each request from add to finish (engine thread only) and logs its line at the end."""

    def __init__(self, logger: logging.Logger = request_log, clock=time.monotonic):
        self.logger = logger
        self.clock = clock
        self._pending: dict[str, _Pending] = {}

    def on_add(self, request: EngineRequest, default_method: str) -> None:
        self._pending[request.request_id] = _Pending(request.arrival_time, request.spec.method or default_method)

    def on_output(self, out: RequestOutput) -> None:
        info = self._pending.get(out.request_id)
        if info is None:
            return
        if info.first_token_time is None and out.new_token_ids:
            info.first_token_time = self.clock()
        if out.finished:
            del self._pending[out.request_id]
            if self.logger.isEnabledFor(logging.INFO):
                self.logger.info("request finished", extra={"fields": self.fields(out, info)})

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def fields(self, out: RequestOutput, info: _Pending) -> dict:
        now = self.clock()
        spec = out.spec
        ttft = None if info.first_token_time is None else round(info.first_token_time - info.arrival_time, 4)
        return {
            "request_id": out.request_id,
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
            "prompt_tokens": out.num_prompt_tokens,
            "output_tokens": out.num_output_tokens,
            "method": info.method,
            "spec_steps": spec.steps,
            "draft_tokens": spec.draft_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "acceptance": round(spec.accepted_tokens / spec.draft_tokens, 4) if spec.draft_tokens else None,
            "mean_acceptance_length": round(spec.mean_acceptance_length, 4) if spec.steps else None,
            "ttft_s": ttft,
            "latency_s": round(now - info.arrival_time, 4),
            "error": out.error,
        }


# ---------------------------------------------------------------- periodic engine line


@dataclass
class _Window:
    start: float
    num_steps: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_request_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    speedup_time: float = 0.0
    speedup_weighted: float = 0.0
    last: StepStats = field(default_factory=StepStats)


class EngineStatsLogger:
    """Accumulates StepStats and logs one engine line every `interval` seconds while there is work."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = engine_log, clock=time.monotonic):
        self.interval = interval
        self.logger = logger
        self.clock = clock
        self._window = _Window(start=clock())

    def observe(self, stats: StepStats) -> None:
        w = self._window
        w.last = stats
        w.num_finished += len(stats.finished)
        if stats.batch_size == 0:
            return
        w.num_steps += 1
        w.num_prompt_tokens += stats.num_prefill_tokens
        w.num_generated_tokens += stats.num_generated_tokens
        w.num_preemptions += stats.num_preemptions
        for rec in stats.spec:
            w.num_request_steps += 1
            w.num_draft_tokens += rec.num_draft
            w.num_accepted_tokens += rec.num_accepted
        if stats.speedup is not None:
            w.speedup_time += stats.step_time
            w.speedup_weighted += stats.speedup * stats.step_time

    def maybe_log(self) -> bool:
        """Log and start a new window if the interval passed and the window saw work; True if logged."""
        if self.interval <= 0:
            return False
        now = self.clock()
        w = self._window
        if now - w.start < self.interval:
            return False
        busy = w.num_steps or w.num_finished or w.last.num_running or w.last.num_waiting
        if busy and self.logger.isEnabledFor(logging.INFO):
            self.logger.info("engine", extra={"fields": self.fields(now)})
        self._window = _Window(start=now, last=w.last)
        return bool(busy)

    def fields(self, now: float) -> dict:
        w = self._window
        elapsed = max(now - w.start, 1e-9)
        return {
            "interval_s": round(elapsed, 2),
            "generation_tok_s": round(w.num_generated_tokens / elapsed, 2),
            "prompt_tok_s": round(w.num_prompt_tokens / elapsed, 2),
            "steps": w.num_steps,
            "running": w.last.num_running,
            "waiting": w.last.num_waiting,
            "kv_cache_usage": round(w.last.kv_cache_usage, 4),
            "finished": w.num_finished,
            "preemptions": w.num_preemptions,
            "draft_tokens": w.num_draft_tokens,
            "acceptance": round(w.num_accepted_tokens / w.num_draft_tokens, 4) if w.num_draft_tokens else None,
            "mean_acceptance_length": (round((w.num_request_steps + w.num_accepted_tokens) / w.num_request_steps, 4)
                                       if w.num_request_steps else None),
            "speedup": round(w.speedup_weighted / w.speedup_time, 4) if w.speedup_time else None,
        }
