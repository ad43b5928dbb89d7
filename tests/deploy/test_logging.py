"""Logs: text and JSON formatters, the per-request line, the periodic engine line, and a real server
started with `--log-format json` writing both lines."""
from __future__ import annotations

import io
import json
import logging
import time

import httpx
import pytest

from engine.types import EngineRequest, FinishedStats, FinishReason, RequestOutput, SpecParams, SpecRecord, SpecUsage, StepStats
from server.cli import build_parser
from server.logs import EngineStatsLogger, JsonFormatter, RequestLogger, TextFormatter, configure_logging


class Clock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def capture(name: str, formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, stream


def test_text_formatter_appends_fields_and_keeps_tracebacks_below():
    logger, stream = capture("specd.test.text", TextFormatter())
    logger.info("request finished", extra={"fields": {"request_id": "cmpl-1", "latency_s": 0.123456,
                                                       "reason": "two words", "skipped": None}})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed", extra={"fields": {"k": 1}})
    first, second = stream.getvalue().splitlines()[0], stream.getvalue().splitlines()[1]
    assert first.endswith('request finished request_id=cmpl-1 latency_s=0.1235 reason="two words"')
    assert second.endswith("failed k=1") and "Traceback" in stream.getvalue()


def test_json_formatter_is_one_object_per_line():
    logger, stream = capture("specd.test.json", JsonFormatter())
    logger.warning("hello %s", "world", extra={"fields": {"tokens": 3, "none": None}, "color_message": "x"})
    try:
        raise KeyError("k")
    except KeyError:
        logger.exception("oops")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    a, b = json.loads(lines[0]), json.loads(lines[1])
    assert a["message"] == "hello world" and a["level"] == "WARNING" and a["logger"] == "specd.test.json"
    assert a["tokens"] == 3 and "none" not in a and "color_message" not in a and a["time"].endswith("+00:00")
    assert "KeyError" in b["exception"]


def test_configure_logging_routes_uvicorn_through_one_handler():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        logging.getLogger("uvicorn.error").info("started")
        logging.getLogger("specd.request").debug("hidden")
        assert json.loads(stream.getvalue())["logger"] == "uvicorn.error"
        with pytest.raises(ValueError):
            configure_logging("info", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_cli_log_flags():
    args = build_parser().parse_args(["serve", "--log-format", "json", "--log-interval", "2.5"])
    assert args.log_format == "json" and args.log_interval == 2.5
    assert build_parser().parse_args(["serve"]).log_format == "text"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])


def test_request_logger_line_has_id_tokens_acceptance_latency():
    clock = Clock(10.0)
    logger, stream = capture("specd.test.req", JsonFormatter())
    rl = RequestLogger(logger, clock=clock)
    rl.on_add(EngineRequest("r1", [1, 2, 3], arrival_time=9.5, spec=SpecParams(method="ngram")), "none")
    rl.on_add(EngineRequest("r2", [1], arrival_time=9.9), "jacobi")
    clock.now = 10.25
    rl.on_output(RequestOutput("r1", [], "", 3, 0))  # no token yet: not the first token
    clock.now = 10.5
    rl.on_output(RequestOutput("r1", [7], "x", 3, 1))
    clock.now = 11.5
    rl.on_output(RequestOutput("r1", [8, 9], "yz", 3, 12, finish_reason=FinishReason.LENGTH,
                               spec=SpecUsage(steps=4, draft_tokens=10, accepted_tokens=8)))
    rl.on_output(RequestOutput("unknown", [1], "", 1, 1, finish_reason=FinishReason.STOP))  # never added: ignored
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "r1" and line["finish_reason"] == "length" and line["method"] == "ngram"
    assert line["prompt_tokens"] == 3 and line["output_tokens"] == 12
    assert line["draft_tokens"] == 10 and line["accepted_tokens"] == 8 and line["acceptance"] == 0.8
    assert line["mean_acceptance_length"] == 3.0  # (4 steps + 8 accepted) / 4 steps
    assert line["ttft_s"] == 1.0 and line["latency_s"] == 2.0
    rl.on_output(RequestOutput("r2", [], "", 1, 0, finish_reason=FinishReason.ABORT, error="client gone"))
    second = json.loads(stream.getvalue().splitlines()[1])
    assert second["method"] == "jacobi" and second["finish_reason"] == "abort" and "ttft_s" not in second
    assert second["error"] == "client gone" and "acceptance" not in second
    assert not rl._pending


def test_engine_stats_logger_reports_the_window_and_stays_quiet_when_idle():
    clock = Clock(0.0)
    logger, stream = capture("specd.test.engine", TextFormatter())
    sl = EngineStatsLogger(interval=2.0, logger=logger, clock=clock)
    for speedup in (1.5, 2.5):
        sl.observe(StepStats(step_time=0.1, num_running=3, num_waiting=1, batch_size=3, num_generated_tokens=9,
                             kv_cache_usage=0.25, speedup=speedup,
                             spec=[SpecRecord("ngram", 4, 3), SpecRecord("ngram", 4, 1), SpecRecord("none", 0, 0)]))
    sl.observe(StepStats(step_time=0.3, num_running=0, batch_size=3, num_prefill_tokens=40, num_generated_tokens=3,
                         finished=[FinishedStats(FinishReason.STOP, 5, 5, 0.0, 0.1, 1.0)]))
    clock.now = 1.0
    assert not sl.maybe_log()  # the interval has not passed
    clock.now = 2.0
    assert sl.maybe_log()
    line = stream.getvalue()
    for expected in ("generation_tok_s=10.5", "prompt_tok_s=20", "running=0", "waiting=0", "steps=3",
                     "draft_tokens=16", "acceptance=0.5", "mean_acceptance_length=2.333", "speedup=2",
                     "kv_cache_usage=0", "finished=1"):
        assert expected in line, (expected, line)
    clock.now = 10.0  # an idle window (nothing running or waiting, nothing stepped) logs nothing
    assert not sl.maybe_log()
    assert len(stream.getvalue().splitlines()) == 1
    assert not EngineStatsLogger(interval=0, logger=logger, clock=clock).maybe_log()


def test_server_writes_json_request_and_engine_lines(start_server):
    server = start_server("--spec", "ngram", "--log-level", "info", "--log-format", "json", "--log-interval", "0.2")
    body = {"prompt": "a b c a b c a b c", "max_tokens": 24, "temperature": 0, "n": 2}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        requests = [x for x in lines if x["logger"] == "specd.request"]
        engines = [x for x in lines if x["logger"] == "specd.engine"]
        if len(requests) == 2 and engines:
            break
        time.sleep(0.1)
    raw = [line for line in server.log().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in raw), raw[:5]  # every line is JSON, uvicorn's too
    assert sorted(r["request_id"] for r in requests) == sorted(f"{resp.json()['id']}-0-{i}" for i in range(2))
    for r in requests:
        assert r["method"] == "ngram" and r["output_tokens"] > 0 and r["prompt_tokens"] > 0
        assert r["latency_s"] > 0 and r["ttft_s"] <= r["latency_s"] and "mean_acceptance_length" in r
    assert engines[0]["generation_tok_s"] > 0 and {"running", "waiting", "kv_cache_usage"} <= set(engines[0])
