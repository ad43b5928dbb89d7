"""The benchmarks' open loop (benchmarks/common.py run_arrivals) against the real server: requests go out
at their Poisson arrival times whatever is still in flight, not when a client frees up."""
from __future__ import annotations

import asyncio

import pytest

from benchmarks.common import poisson_arrivals, run_arrivals


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    times = poisson_arrivals(2000, rate=4.0, seed=3)
    assert times == poisson_arrivals(2000, rate=4.0, seed=3) and times != poisson_arrivals(2000, rate=4.0, seed=4)
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] / len(times) == pytest.approx(1 / 4.0, rel=0.1)  # mean gap 1 / rate


def test_requests_are_sent_on_schedule_and_overlap(server_url):
    prompts = [{"prompt": f"Count to {i}.", "category": "qa" if i % 2 else "mt_bench"} for i in range(6)]
    rate = 100.0  # arrivals ~10 ms apart, each request takes longer: several must be in flight at once
    timings, _ = asyncio.run(run_arrivals(server_url, prompts, rate, max_tokens=48))
    assert [t.category for t in timings] == [p["category"] for p in prompts]
    assert all(t.num_output_tokens > 0 for t in timings)
    for timing, at in zip(timings, poisson_arrivals(len(prompts), rate)):
        assert at <= timing.sent_at < at + 0.25  # sent at its arrival time, not after a free client
    # An open loop does not wait for answers: a request goes out while the one before is in flight.
    assert any(b.sent_at < a.sent_at + a.e2e for a, b in zip(timings, timings[1:]))
