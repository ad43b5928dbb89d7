"""Continuous-batching scheduler with token accounting (Orca-style iteration-level scheduling,
vLLM v1's "no phases" formulation, Sarathi-style chunked prefill).

Every running request has `num_computed_tokens`: the leading `token_ids` whose K/V is cached.
A step gives each scheduled request `num_new_tokens` and the runner computes
`token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]`; prefill, chunked prefill,
decode and (later) verify are all that. After the step the engine samples, appends tokens and calls
`update_after_step`, so a decoding request always has exactly one uncomputed token.

A step is built in phases, under `max_num_batched_tokens` and `max_num_seqs`:
  1. decoding requests (one token each): never starved by prefills;
  2. running requests still prefilling (chunked: min(remaining, budget left));
  3. waiting requests in FIFO order, chunked the same way, while KV blocks allow.
When KV runs out in phases 1-2 the newest running request is preempted (blocks freed, pushed to the
front of waiting, recomputed from scratch later). A request that cannot fit even alone is finished
with FinishReason.ERROR and handed to the engine through `pop_failed()`.

Pure Python: no torch.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from engine.config import SchedulerConfig
from engine.kv_cache import KVCacheManager
from engine.types import (FinishReason, Request, RequestStatus, ScheduledRequest,
                          SchedulerOutput)


class QueueFullError(Exception):
    """The waiting queue holds `max_queue` requests; the server answers 429."""


class _StepBuilder:
    """The step under construction: token budget left, scheduled requests, preemptions."""

    def __init__(self, budget: int):
        self.budget = budget
        self.scheduled: dict[str, ScheduledRequest] = {}
        self.num_reserved: dict[str, int] = {}  # tokens each scheduled request holds, drafts included
        self.preempted_ids: list[str] = []

    def add(self, request: Request, num_new_tokens: int, num_draft_tokens: int = 0) -> None:
        self.scheduled[request.request_id] = ScheduledRequest(request, num_new_tokens,
                                                              max_draft_tokens=num_draft_tokens)
        self.num_reserved[request.request_id] = num_new_tokens + num_draft_tokens
        self.budget -= num_new_tokens + num_draft_tokens

    def remove(self, request: Request) -> None:
        """Take back a request's share (it was preempted after being scheduled)."""
        if self.scheduled.pop(request.request_id, None) is not None:
            self.budget += self.num_reserved.pop(request.request_id)

    def output(self) -> SchedulerOutput:
        return SchedulerOutput(list(self.scheduled.values()), self.preempted_ids)


class Scheduler:
    """Owns the waiting queue and the running set; decides what every step computes."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 draft_policy: Callable[[Request], int] | None = None):
        self.config = config
        self.kv = kv
        self.draft_policy = draft_policy or (lambda request: 0)
        """How many drafts a request would like this step (the engine's speculation controller)."""
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the last one is the newest
        self._requests: dict[str, Request] = {}  # every waiting or running request
        self._failed: list[Request] = []

    # ------------------------------------------------------------ queries

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running(self) -> list[Request]:
        return list(self._running)

    @property
    def waiting(self) -> list[Request]:
        return list(self._waiting)

    @property
    def has_unfinished(self) -> bool:
        """Work left for the engine loop, failed requests not yet reported included."""
        return bool(self._waiting or self._running or self._failed)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ------------------------------------------------------------ request lifecycle

    def add(self, request: Request) -> None:
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFullError(f"{len(self._waiting)} requests are waiting")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self._waiting.append(request)
        self._requests[request.request_id] = request

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks; None if unknown or finished."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self.finish(request, FinishReason.ABORT)
        return request

    def finish(self, request: Request, reason: FinishReason) -> None:
        if self._requests.pop(request.request_id, None) is None:
            return  # already finished: finishing twice must not free twice
        if request.status == RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def pop_failed(self) -> list[Request]:
        """Requests the scheduler finished with FinishReason.ERROR since the last call."""
        failed, self._failed = self._failed, []
        return failed

    # ------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        step = _StepBuilder(self.config.max_num_batched_tokens)
        self._schedule_decodes(step)
        self._schedule_running_prefills(step)
        # Admitting right after a preemption would just thrash: the cache is full.
        if not step.preempted_ids:
            self._admit_waiting(step)
        return step.output()

    def update_after_step(self, sched: SchedulerOutput) -> None:
        """The runner computed the scheduled tokens: move each request's computed mark."""
        for entry in sched.scheduled:
            request = entry.request
            if not request.is_finished:
                request.num_computed_tokens += entry.num_new_tokens

    def draft_budget(self, request: Request, budget_left: int) -> int:
        """How many draft tokens `request` may verify this step (speculation hook, issue 3).

        Called only for decoding requests, after their one real token is counted; the result is
        reserved in the token budget and in KV slots, so it must also respect the free KV blocks
        (asking for more than fits would preempt other requests for the sake of drafts).
        """
        wanted = self.draft_policy(request)
        if wanted <= 0:
            return 0
        num_slots_owned = len(request.block_ids) * self.kv.block_size
        spare_slots = num_slots_owned - (request.num_cache_slots + 1) + self.kv.num_free_blocks * self.kv.block_size
        return max(0, min(wanted, budget_left, spare_slots))

    # ------------------------------------------------------------ phases

    def _schedule_decodes(self, step: _StepBuilder) -> None:
        """Phase 1: every decoding request gets its token first, so prefills never starve it."""
        for request in [r for r in self._running if self._num_uncomputed(r) == 1]:
            if request.status != RequestStatus.RUNNING:
                continue  # preempted by an earlier request of this loop
            if step.budget <= 0:
                return
            num_draft = self.draft_budget(request, step.budget - 1)
            if self._allocate_or_preempt(request, 1 + num_draft, step):
                step.add(request, 1, num_draft)

    def _schedule_running_prefills(self, step: _StepBuilder) -> None:
        """Phase 2: running requests still prefilling get the next chunk of their prompt."""
        for request in [r for r in self._running if self._num_uncomputed(r) > 1]:
            if request.status != RequestStatus.RUNNING:
                continue
            if step.budget <= 0:
                return
            num_new = min(self._num_uncomputed(request), step.budget)
            if self._allocate_or_preempt(request, num_new, step):
                step.add(request, num_new)

    def _admit_waiting(self, step: _StepBuilder) -> None:
        """Phase 3: admit waiting requests FIFO; stop at the first one the cache can't hold."""
        while self._waiting and step.budget > 0 and len(self._running) < self._max_running:
            request = self._waiting[0]
            num_new = min(self._num_uncomputed(request), step.budget)
            if num_new <= 0:
                self._fail(request, "request has no tokens to compute")
                continue
            if self.kv.blocks_needed(request.num_tokens) > self.kv.num_blocks:
                # Fail now rather than after prefilling chunks that could never all fit.
                self._fail(request, "request does not fit in the KV cache")
                continue
            if not self.kv.allocate(request, request.num_cache_slots + num_new):
                if not self._running:  # all blocks are free and it still does not fit
                    self._fail(request, "request does not fit in the KV cache")
                    continue
                return  # FIFO: don't let later, smaller requests overtake it
            self._waiting.popleft()
            self._running.append(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            step.add(request, num_new)

    # ------------------------------------------------------------ helpers

    @property
    def _max_running(self) -> int:
        # More running requests than budget tokens would starve the decodes at the back forever.
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    @staticmethod
    def _num_uncomputed(request: Request) -> int:
        return request.num_tokens - request.num_computed_tokens

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _StepBuilder) -> bool:
        """Make room for `num_new` more slots, preempting the newest running requests if needed.

        Returns False when `request` itself had to go (preempted, or failed when it can't fit
        even alone).
        """
        num_slots = request.num_cache_slots + num_new
        while not self.kv.allocate(request, num_slots):
            victim = self._running[-1]
            if victim is request and len(self._running) == 1:
                self._fail(request, "request does not fit in the KV cache")
                return False
            step.remove(victim)
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, step: _StepBuilder) -> None:
        """Drop its K/V and requeue it first; recomputing prompt + output later is the price."""
        self._running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.kv_padding = []
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._waiting.appendleft(request)
        step.preempted_ids.append(request.request_id)

    def _fail(self, request: Request, why: str) -> None:
        request.state["error"] = why
        self.finish(request, FinishReason.ERROR)
        self._failed.append(request)
