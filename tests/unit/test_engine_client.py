"""The engine-thread bridge (server/engine_client.py) against a fake engine.

The fake stands in for LLMEngine's interface only (add/abort/step/has_unfinished), so these tests
exercise the threading, ordering, abort, failure and backpressure logic, not a model.
"""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams, StepStats
from server.engine_client import EngineClient, EngineNotReadyError, QueueFullError


class FakeTokenizer:
    vocab_size = 256
    eos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class FakeEngine:
    """One token per request per step ('a', 'b', ...); max_tokens ends it with LENGTH."""

    def __init__(self, max_queue=8, max_running=4, step_delay=0.0):
        self.tokenizer = FakeTokenizer()
        self.model_name = "fake"
        self.max_model_len = 64
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_queue=max_queue))
        self.max_running = max_running
        self.step_delay = step_delay
        self.waiting: list[EngineRequest] = []
        self.running: dict[str, list] = {}
        self.pending: list[RequestOutput] = []
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.last_stats = StepStats()
        self.thread_ids: set[int] = set()

    def add_request(self, req):
        self.thread_ids.add(threading.get_ident())
        if len(self.waiting) >= self.config.scheduler.max_queue:
            raise QueueFullError("full")
        self.waiting.append(req)

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        found = self.running.pop(request_id, None) is not None
        before = len(self.waiting)
        self.waiting = [r for r in self.waiting if r.request_id != request_id]
        if found or len(self.waiting) < before:
            self.pending.append(RequestOutput(request_id, [], "", 1, 0, finish_reason=FinishReason.ABORT))

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running or self.pending)

    @property
    def num_waiting(self):
        return len(self.waiting)

    @property
    def num_running(self):
        return len(self.running)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting.pop(0)
            self.running[req.request_id] = [req, 0]
        outputs, self.pending = self.pending, []
        for request_id, entry in list(self.running.items()):
            req, count = entry
            entry[1] = count = count + 1
            done = count >= req.sampling.max_tokens
            outputs.append(RequestOutput(request_id, [count], chr(ord("a") + count - 1), 1, count,
                                         finish_reason=FinishReason.LENGTH if done else None))
            if done:
                del self.running[request_id]
        self.last_stats = StepStats(batch_size=len(outputs))
        return outputs


class FakeExporter:
    def __init__(self):
        self.steps = 0

    def observe_step(self, stats):
        self.steps += 1


def req(request_id, max_tokens=3):
    return EngineRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens))


async def started(engine, **kwargs) -> EngineClient:
    client = EngineClient(lambda: engine, **kwargs)
    client.start()
    assert await client.wait_ready(5)
    return client


async def collect(client, request):
    return [out async for out in client.generate(request)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_outputs_in_order_on_the_engine_thread():
    async def main():
        engine, exporter = FakeEngine(), FakeExporter()
        client = await started(engine, exporter=exporter)
        outs = await collect(client, req("r1", max_tokens=4))
        assert "".join(o.new_text for o in outs) == "abcd"
        assert [o.finish_reason for o in outs] == [None, None, None, FinishReason.LENGTH]
        assert threading.get_ident() not in engine.thread_ids and len(engine.thread_ids) == 1
        await client.shutdown(timeout=1)
        # after shutdown: a step's outputs are sent before the step is observed, so the last
        # observation can land just after the client has its final output
        assert exporter.steps >= 4
    run(main())


def test_concurrent_requests_all_complete():
    async def main():
        client = await started(FakeEngine(max_queue=64))
        results = await asyncio.gather(*(collect(client, req(f"r{i}", max_tokens=i % 5 + 1)) for i in range(20)))
        for i, outs in enumerate(results):
            assert len(outs) == i % 5 + 1 and outs[-1].finished
        assert client.num_in_flight == 0
        await client.shutdown(timeout=1)
    run(main())


def test_closing_the_consumer_aborts_the_request():
    async def main():
        engine = FakeEngine(step_delay=0.005)
        client = await started(engine)
        gen = client.generate(req("r1", max_tokens=1000))
        first = await gen.__anext__()
        assert first.new_text == "a"
        await gen.aclose()
        for _ in range(100):
            if "r1" in engine.aborted and not engine.running:
                break
            await asyncio.sleep(0.01)
        assert "r1" in engine.aborted and not engine.running
        await client.shutdown(timeout=1)
    run(main())


def test_cancelled_consumer_aborts_the_request():
    async def main():
        engine = FakeEngine(step_delay=0.005)
        client = await started(engine)
        task = asyncio.ensure_future(collect(client, req("r1", max_tokens=1000)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if "r1" in engine.aborted:
                break
            await asyncio.sleep(0.01)
        assert "r1" in engine.aborted
        await client.shutdown(timeout=1)
    run(main())


def test_step_exception_fails_running_requests_and_keeps_serving():
    async def main():
        engine = FakeEngine(step_delay=0.005)
        client = await started(engine)
        tasks = [asyncio.ensure_future(collect(client, req(f"r{i}", max_tokens=1000))) for i in range(3)]
        await asyncio.sleep(0.1)
        engine.fail_next_step = True
        results = await asyncio.gather(*tasks)
        for outs in results:
            assert outs[-1].finish_reason == FinishReason.ERROR and "boom" in outs[-1].error
        assert not engine.running and not engine.waiting
        outs = await collect(client, req("after", max_tokens=2))
        assert outs[-1].finish_reason == FinishReason.LENGTH
        await client.shutdown(timeout=1)
    run(main())


def test_queue_full_raises_synchronously():
    async def main():
        engine = FakeEngine(max_queue=2, max_running=0)  # nothing ever leaves the waiting queue
        client = await started(engine)
        group = client.submit([req("a"), req("b")])
        with pytest.raises(QueueFullError):
            client.submit([req("c")])
        with pytest.raises(QueueFullError):
            await collect(client, req("d"))
        group.abort()
        client._forget(group.request_ids)
        await client.shutdown(timeout=1)
    run(main())


def test_max_queue_argument_overrides_the_engine_config():
    async def main():
        client = await started(FakeEngine(max_queue=100, max_running=0), max_queue=1)
        with pytest.raises(QueueFullError):
            client.submit([req("a"), req("b")])
        await client.shutdown(timeout=1)
    run(main())


def test_shutdown_waits_for_in_flight_then_refuses():
    async def main():
        client = await started(FakeEngine(step_delay=0.01))
        task = asyncio.ensure_future(collect(client, req("r1", max_tokens=20)))
        await asyncio.sleep(0.05)
        await client.shutdown(timeout=10)
        outs = task.result()  # shutdown returned only after the request finished
        assert outs[-1].finish_reason == FinishReason.LENGTH and len(outs) == 20
        assert client.draining
        with pytest.raises(EngineNotReadyError):
            client.submit([req("late")])
    run(main())


def test_not_ready_while_loading_and_load_error_reported():
    async def main():
        gate = threading.Event()

        def slow_factory():
            gate.wait(5)
            return FakeEngine()

        client = EngineClient(slow_factory)
        client.start()
        await asyncio.sleep(0.05)
        assert not client.ready
        with pytest.raises(EngineNotReadyError):
            client.submit([req("early")])
        gate.set()
        assert await client.wait_ready(5)
        await client.shutdown(timeout=1)

        errors = []

        def broken():
            raise OSError("no weights")

        client = EngineClient(broken, on_load_error=errors.append)
        client.start()
        assert not await client.wait_ready(5)
        await asyncio.sleep(0.05)
        assert isinstance(client.load_error, OSError) and errors and not client.ready
    run(main())


def test_shutdown_timeout_ends_stragglers_with_abort():
    async def main():
        engine = FakeEngine(step_delay=0.01)
        client = await started(engine)
        task = asyncio.ensure_future(collect(client, req("slow", max_tokens=100_000)))
        await asyncio.sleep(0.05)
        await client.shutdown(timeout=0.1)
        outs = await asyncio.wait_for(task, 5)
        assert outs[-1].finish_reason == FinishReason.ABORT and "shutting down" in outs[-1].error
        assert "slow" in engine.aborted
    run(main())
