"""Scheduler: FIFO admission, chunked prefill beside decodes, limits, abort, preemption, failure,
and a randomized stress run that checks the invariants after every step.

The engine loop is simulated: schedule -> append a fake token to every request whose
ScheduledRequest.samples is True -> update_after_step -> finish requests that reached their length.
"""
from __future__ import annotations

import random

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.scheduler import QueueFullError, Scheduler
from engine.types import FinishReason, Request, RequestStatus, SamplingParams, SchedulerOutput

FAKE_TOKEN = 7


def make_request(request_id: str, num_prompt_tokens: int) -> Request:
    return Request(request_id, [1] * num_prompt_tokens, num_prompt_tokens, SamplingParams())


def make_scheduler(num_blocks=64, block_size=16, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), KVCacheManager(num_blocks, block_size))


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    kv, config = sched.kv, sched.config
    kv.check_invariants(sched.running)  # disjoint tables, free + used == total
    assert out.total_num_tokens <= config.max_num_batched_tokens
    assert sched.num_running <= config.max_num_seqs
    assert all(not r.block_ids and r.num_computed_tokens == 0 for r in sched.waiting)
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    for s in out.scheduled:
        r = s.request
        assert r.status == RequestStatus.RUNNING and s.num_new_tokens > 0
        assert r.num_computed_tokens + s.num_new_tokens <= r.num_tokens
        assert kv.num_slots(r) >= r.num_computed_tokens + s.num_new_tokens


def engine_step(sched: Scheduler, target_lens: dict[str, int]) -> SchedulerOutput:
    """One simulated engine step; returns the scheduler output."""
    out = sched.schedule()
    check_invariants(sched, out)
    sampling = [s.request for s in out.scheduled if s.samples]
    sched.update_after_step(out)
    for r in sampling:
        r.token_ids.append(FAKE_TOKEN)
        if r.num_tokens >= target_lens[r.request_id]:
            sched.finish(r, FinishReason.LENGTH)
    return out


def run_to_completion(sched: Scheduler, target_lens: dict[str, int], max_steps=10_000) -> list[Request]:
    failed = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return failed
        engine_step(sched, target_lens)
        failed += sched.pop_failed()
    raise AssertionError("scheduler did not finish (deadlock or starvation)")


def test_fifo_admission_and_first_scheduled_time():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", 10) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [s.num_new_tokens for s in out.scheduled] == [10, 10]
    assert all(s.samples for s in out.scheduled)
    assert reqs[0].first_scheduled_time is not None and reqs[2].first_scheduled_time is None
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert sched.waiting == [reqs[2]]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=3)
    target = {}
    for i in range(10):
        sched.add(make_request(f"r{i}", 5))
        target[f"r{i}"] = 8
    for _ in range(5):
        out = engine_step(sched, target)
        assert len(out.scheduled) <= 3
    run_to_completion(sched, target)


def test_queue_full_raises():
    sched = make_scheduler(max_queue=2)
    sched.add(make_request("a", 4))
    sched.add(make_request("b", 4))
    with pytest.raises(QueueFullError):
        sched.add(make_request("c", 4))
    assert isinstance(QueueFullError("x"), Exception)
    sched.schedule()  # admits both: the queue has room again
    sched.add(make_request("c", 4))


def test_duplicate_request_id_rejected():
    sched = make_scheduler()
    sched.add(make_request("a", 4))
    with pytest.raises(ValueError):
        sched.add(make_request("a", 4))


def test_chunked_prefill_does_not_starve_decodes():
    sched = make_scheduler(num_blocks=1024, max_num_batched_tokens=512)
    target = {f"d{i}": 10_000 for i in range(16)}
    for i in range(16):
        sched.add(make_request(f"d{i}", 10))
    engine_step(sched, target)  # all 16 prefilled; now each has one uncomputed token
    long = make_request("long", 3000)
    target["long"] = 3001
    sched.add(long)
    num_chunks = 0
    while not long.is_finished:
        out = engine_step(sched, target)
        by_id = {s.request.request_id: s for s in out.scheduled}
        assert all(by_id[f"d{i}"].num_new_tokens == 1 for i in range(16))
        assert out.total_num_tokens <= 512
        if "long" in by_id:
            num_chunks += 1
            assert by_id["long"].num_new_tokens == min(496, 3000 - 496 * (num_chunks - 1))
    assert num_chunks == -(-3000 // 496)
    assert long.num_output_tokens == 1


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", 20), make_request("b", 20)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert a.block_ids and sched.kv.num_free_blocks == 62
    assert sched.abort("b") is b and b.finish_reason == FinishReason.ABORT and b.is_finished
    assert sched.abort("a") is a and a.block_ids == [] and sched.kv.num_free_blocks == 64
    assert sched.abort("a") is None and sched.abort("nope") is None
    assert not sched.has_unfinished and sched.get("a") is None
    assert sched.schedule().is_empty


def test_update_after_step_skips_finished_and_counts_chunks():
    sched = make_scheduler(max_num_batched_tokens=8)
    r = make_request("r", 20)
    sched.add(r)
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 8 and not out.scheduled[0].samples
    sched.update_after_step(out)
    assert r.num_computed_tokens == 8
    out = sched.schedule()
    sched.finish(r, FinishReason.STOP)
    sched.update_after_step(out)
    assert r.num_computed_tokens == 8 and sched.kv.num_free_blocks == 64


def test_preemption_picks_newest_and_everything_completes():
    # 6 blocks of 4 slots; three requests that each grow to 12 tokens (3 blocks) can't all fit.
    sched = make_scheduler(num_blocks=6, block_size=4)
    reqs = [make_request(n, 4) for n in "abc"]
    target = {n: 12 for n in "abc"}
    for r in reqs:
        sched.add(r)
    first_preemption = None
    for _ in range(200):
        if not sched.has_unfinished:
            break
        out = engine_step(sched, target)
        if out.preempted_ids and first_preemption is None:
            first_preemption = out.preempted_ids[0]
            victim = sched.get(first_preemption)
            assert first_preemption == "c"  # the newest arrival
            assert sched.waiting[0] is victim and victim.block_ids == []
            assert victim.num_computed_tokens == 0 and victim.status == RequestStatus.WAITING
            assert victim.num_preemptions == 1
            assert "c" not in {s.request.request_id for s in out.scheduled}
    assert first_preemption is not None
    assert all(r.finish_reason == FinishReason.LENGTH and r.num_tokens == 12 for r in reqs)
    assert sched.kv.num_free_blocks == 6


def test_preempted_request_recomputes_prompt_and_output():
    sched = make_scheduler(num_blocks=6, block_size=4)
    reqs = [make_request(n, 4) for n in "abc"]
    target = {n: 12 for n in "abc"}
    for r in reqs:
        sched.add(r)
    c = reqs[2]
    while not c.num_preemptions:
        engine_step(sched, target)
    num_tokens = c.num_tokens
    assert num_tokens > c.num_prompt_tokens  # it had generated tokens before
    while c.status == RequestStatus.WAITING:
        out = engine_step(sched, target)
    (entry,) = [s for s in out.scheduled if s.request is c]
    assert entry.num_new_tokens == num_tokens  # prompt + generated, all recomputed


def test_request_too_big_for_cache_fails_instead_of_hanging():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 slots
    big, ok = make_request("big", 20), make_request("ok", 4)
    sched.add(big)
    sched.add(ok)
    failed = run_to_completion(sched, {"big": 21, "ok": 8})
    assert failed == [big] and big.finish_reason == FinishReason.ERROR
    assert big.num_computed_tokens == 0  # failed before wasting compute on it
    assert ok.finish_reason == FinishReason.LENGTH and ok.num_tokens == 8
    assert sched.kv.num_free_blocks == 4


def test_request_outgrowing_cache_while_decoding_fails():
    sched = make_scheduler(num_blocks=4, block_size=4)
    r = make_request("r", 10)
    sched.add(r)
    failed = run_to_completion(sched, {"r": 100})
    assert failed == [r] and r.finish_reason == FinishReason.ERROR
    assert r.num_tokens == 17  # the 17th token needed a 5th block
    assert sched.kv.num_free_blocks == 4


def test_outgrowing_request_preempts_others_then_fails_alone():
    sched = make_scheduler(num_blocks=4, block_size=4)
    long, short = make_request("long", 8), make_request("short", 4)
    sched.add(long)
    sched.add(short)
    failed = run_to_completion(sched, {"long": 100, "short": 10})
    assert failed == [long]
    assert short.finish_reason == FinishReason.LENGTH and short.num_tokens == 10


@pytest.mark.parametrize("seed", range(8))
def test_randomized_stress(seed):
    rng = random.Random(seed)
    sched = make_scheduler(
        num_blocks=rng.choice([8, 20, 64]), block_size=rng.choice([1, 4, 16]),
        max_num_seqs=rng.choice([1, 4, 16]), max_num_batched_tokens=rng.choice([8, 64, 512]),
        max_queue=rng.choice([4, 32]))
    capacity = sched.kv.num_blocks * sched.kv.block_size
    target, all_reqs, num_arrivals = {}, [], 0
    for step in range(3000):
        if num_arrivals < 60 and rng.random() < 0.3:
            r = make_request(f"r{num_arrivals}", rng.randint(1, capacity + 8))
            try:
                sched.add(r)
                target[r.request_id] = r.num_prompt_tokens + rng.randint(1, 40)
                all_reqs.append(r)
            except QueueFullError:
                assert sched.num_waiting >= sched.config.max_queue
            num_arrivals += 1
        if all_reqs and rng.random() < 0.05:
            sched.abort(rng.choice(all_reqs).request_id)
        engine_step(sched, target)
        sched.pop_failed()
        if num_arrivals >= 60 and not sched.has_unfinished:
            break
    assert not sched.has_unfinished, "stress run did not drain"
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    for r in all_reqs:
        assert r.is_finished and r.block_ids == []
        if r.finish_reason == FinishReason.LENGTH:
            assert r.num_tokens == target[r.request_id]
        if r.finish_reason == FinishReason.ERROR:
            assert target[r.request_id] > capacity or r.num_prompt_tokens > capacity


def test_empty_prompt_fails_instead_of_idling():
    sched = make_scheduler()
    r = make_request("empty", 0)
    sched.add(r)
    assert sched.schedule().is_empty
    assert sched.pop_failed() == [r] and r.finish_reason == FinishReason.ERROR
    assert not sched.has_unfinished


def test_running_capped_by_token_budget_so_decodes_never_starve():
    sched = make_scheduler(max_num_seqs=8, max_num_batched_tokens=4)
    target = {f"r{i}": 6 for i in range(8)}
    for i in range(8):
        sched.add(make_request(f"r{i}", 1))
    for _ in range(3):
        engine_step(sched, target)
        assert sched.num_running <= 4
    run_to_completion(sched, target)


def test_draft_budget_hook_is_zero_until_speculation():
    sched = make_scheduler()
    assert sched.draft_budget(make_request("r", 4), budget_left=100) == 0
