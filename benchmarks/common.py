"""Shared benchmark helpers: Spec-Bench prompts, a real specd server subprocess, a streaming client."""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPECD_BENCH_DATA", ROOT.parent / "shared" / "data"))
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}


def load_spec_bench(per_category: int) -> list[dict]:
    """First-turn Spec-Bench prompts, `per_category` from each of its six categories (MT-bench as one)."""
    rows, taken = [], {}
    for line in (DATA / "spec_bench_prompts_first_turn.jsonl").read_text().splitlines():
        row = json.loads(line)
        cat = "mt_bench" if row["category"] in MT_BENCH else row["category"]
        if taken.get(cat, 0) < per_category:
            taken[cat] = taken.get(cat, 0) + 1
            rows.append({"category": cat, "prompt": row["prompt"], "id": row["question_id"]})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`specd serve` in a subprocess, on a free loopback port, stopped with SIGTERM."""

    def __init__(self, *args: str, timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *args]
        # The server's log goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB; the server logs
        # ~300 bytes per request) and then blocks the server's next log write. A 20-minute spec.py run died
        # on a 600 s read timeout that way, most likely; with the file the same run finished.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # a server that never became ready is not left running
            raise

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"specd exited: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("specd did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@dataclass
class RequestTiming:
    category: str
    num_output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    token_times: list[float] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    sent_at: float = 0.0  # seconds from the load's start (run_arrivals)


async def stream_chat(client: httpx.AsyncClient, url: str, prompt: str, category: str, max_tokens: int,
                      extra: dict | None = None) -> RequestTiming:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    timing = RequestTiming(category)
    start = time.perf_counter()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                timing.token_times.append(time.perf_counter() - start)
    timing.e2e = time.perf_counter() - start
    timing.ttft = timing.token_times[0] if timing.token_times else timing.e2e
    timing.num_output_tokens = timing.usage.get("completion_tokens", len(timing.token_times))
    return timing


async def run_load(url: str, prompts: list[dict], concurrency: int, max_tokens: int,
                   extra: dict | None = None) -> tuple[list[RequestTiming], float]:
    """Send every prompt with `concurrency` clients in flight; return timings and the wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    timings: list[RequestTiming] = []

    async def client_loop(client):
        while not queue.empty():
            p = queue.get_nowait()
            try:
                timing = await stream_chat(client, url, p["prompt"], p["category"], max_tokens, extra)
            except httpx.RemoteProtocolError:
                # The server closed a kept-alive connection as the request went out (llama.cpp's server
                # did, after a few streamed requests): no response began, so send it once more.
                timing = await stream_chat(client, url, p["prompt"], p["category"], max_tokens, extra)
            timings.append(timing)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return timings, time.perf_counter() - start


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """Start times (seconds) of `count` requests arriving as a Poisson process of `rate` per second;
    the same seed gives every method the same schedule."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


async def run_arrivals(url: str, prompts: list[dict], rate: float, max_tokens: int,
                       extra: dict | None = None, seed: int = 0) -> tuple[list[RequestTiming], float]:
    """Open loop: send each prompt at its arrival time (`poisson_arrivals`), whatever is still in flight.

    Unlike run_load's closed loop, the offered load does not grow when the server answers sooner, as
    with real traffic: with N clients in a closed loop, a method that finishes some requests sooner
    also brings the next prompts sooner, and every request in flight shares those prompts' prefill."""
    start = time.perf_counter()

    async def send(client, p, at):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent_at = time.perf_counter() - start
        timing = await stream_chat(client, url, p["prompt"], p["category"], max_tokens, extra)
        timing.sent_at = sent_at
        return timing

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=None)) as client:
        timings = await asyncio.gather(*(send(client, p, at) for p, at in
                                         zip(prompts, poisson_arrivals(len(prompts), rate, seed))))
    return list(timings), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def inter_token_latencies(timings: list[RequestTiming]) -> list[float]:
    return [b - a for t in timings for a, b in zip(t.token_times, t.token_times[1:])]


def latency_summary(timings: list[RequestTiming]) -> dict:
    """TTFT, inter-token and end-to-end latency p50 / p99 (seconds) over a run's requests."""
    itl = inter_token_latencies(timings)
    series = {"ttft": [t.ttft for t in timings], "itl": itl, "e2e": [t.e2e for t in timings]}
    return {f"{key}_p{q}": percentile(values, q) for key, values in series.items() for q in (50, 99)}


def write_results(payload: dict, out: Path) -> None:
    """Print the result as one JSON line and write it to `out`, with its PNG charts beside it
    (benchmarks/plots.py; skipped with a message when matplotlib is not installed)."""
    from benchmarks.plots import save_charts

    out.parent.mkdir(parents=True, exist_ok=True)
    payload["charts"] = save_charts(out, payload["benchmark"], payload["rows"])
    line = json.dumps(payload)
    out.write_text(line + "\n")
    print(line)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
