"""The engine: one `step()` = schedule -> run the model -> sample -> update requests.

Not thread-safe: the server's engine thread is its only caller (server/engine_client.py).
Speculation (issue 3) slots in between "run" and "update": proposers fill `ScheduledRequest.draft`
and the verifier turns a request's logits rows into several tokens, which `_append_tokens`
already accepts as a list and truncates at the first stop, exactly as plain decoding would.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from engine.config import PADDED_KV_NEEDS_CPU, EngineConfig, ModelConfig
from engine.detokenizer import OutputText
from engine.kv_cache import KVCacheManager
from engine.model_runner import ModelRunner
from engine.models.loader import model_name, resolve_model_dir
from engine.scheduler import Scheduler
from engine.spec.bpd import HEAD_ROW_SHARE
from engine.spec.controller import ATTENTION_CALIBRATION, CALIBRATION_ROWS
from engine.speculation import Speculator, accepted_path_moves, unpad
from engine.verify_step import Verified, verify_step
from engine.tokenizer import Tokenizer
from engine.types import (DraftTree, EngineRequest, FinishedStats, FinishReason, Request, RequestOutput,
                          SamplingParams, ScheduledRequest, SchedulerOutput, SpecRecord, StepStats, TokenLogprob)

log = logging.getLogger(__name__)
HEAD_CALIBRATION_ROWS = 8  # verify rows of the step that measures what BPD's head rows cost


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """auto: bf16 on CUDA; int8 on the CPU, which meets specd's quality bar against fp32 (top-1
    agreement >= 98%, perplexity within 2%: benchmarks/int8_quality.py) and is faster than fp32 at
    small batches (slower when many draft rows are verified: README)."""
    if dtype == "auto":
        return "bf16" if device == "cuda" else "int8"
    return dtype


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        self.model_name = model_name(config.model)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.model_config = ModelConfig.from_hf_dir(model_dir)
        self.device = pick_device(config.device)
        if config.spec_layout == "padded-kv" and self.device != "cpu":  # --device auto found a GPU
            raise ValueError(PADDED_KV_NEEDS_CPU)
        self.runner = ModelRunner(self.model_config, model_dir, config.cache, self.device,
                                  pick_dtype(config.dtype, self.device))
        self.kv = KVCacheManager(config.cache.num_blocks, config.cache.block_size)
        self.max_model_len = min(config.scheduler.max_model_len, self.model_config.max_position_embeddings,
                                 config.cache.num_blocks * config.cache.block_size)
        self.spec = Speculator(config, model_dir)
        self.runner.set_lookahead(self.spec.lookahead_embeds)
        self.runner.set_heads(self.spec.draft_heads)
        self.spec.bind_model(self.runner.model.embed, self.runner.model.dense_lm_head)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.spec.draft_policy)
        cost_model = self.spec.controller.cost_model
        cost_model.calibrate(self._forward_rows, self._calibration_rows())
        rows, context = ATTENTION_CALIBRATION
        if rows * (context + 1) <= self.kv.num_free_blocks * self.kv.block_size:
            cost_model.calibrate_attention(self._forward_rows, rows, context)
        if self.spec.draft_heads is not None:
            self.spec.proposers["bpd"].head_row_share = self._head_row_share()
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._pending: list[RequestOutput] = []  # outputs produced between steps (aborts)
        self._pending_finished: list[FinishedStats] = []
        self.last_stats = StepStats()

    # ------------------------------------------------------------ requests in and out

    def add_request(self, req: EngineRequest) -> None:
        self.spec.check_method(req.spec.method)
        request = Request(request_id=req.request_id, token_ids=list(req.prompt_token_ids),
                          num_prompt_tokens=len(req.prompt_token_ids), sampling=req.sampling, spec=req.spec,
                          arrival_time=req.arrival_time)
        request.state["text"] = OutputText(self.tokenizer, request.token_ids, req.sampling.stop)
        self.scheduler.add(request)  # raises QueueFullError: nothing else to undo

    def abort_request(self, request_id: str) -> None:
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._pending.append(self._final_output(request, FinishReason.ABORT, [], "", None))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    # ------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        self.spec.prepare(self.scheduler.running, self.max_model_len)
        sched = self.scheduler.schedule()
        outputs, self._pending = self._pending, []
        outputs += [self._fail(r, r.state.get("error", "request cannot be scheduled")) for r in self.scheduler.pop_failed()]
        stats = StepStats(batch_size=len(sched.scheduled), num_preemptions=len(sched.preempted_ids))
        if not sched.is_empty:
            outputs += self._run(sched, stats)
        self._finish_stats(stats, time.perf_counter() - start)
        return outputs

    def _run(self, sched: SchedulerOutput, stats: StepStats) -> list[RequestOutput]:
        entries = [s for s in sched.scheduled if s.samples]
        self._count_tokens(sched, stats)
        real_drafts = self.spec.attach(sched)
        model_out = self.runner.execute(sched)
        logits = unpad(model_out.logits, entries, real_drafts) if self.spec.padded else model_out.logits
        hidden = model_out.hidden_states if self.spec.wants_hidden and not self.spec.padded else None
        verified = verify_step(logits, entries, self.spec.top_k_for(entries), model_out.lookahead_logits,
                               model_out.head_logits, self.spec.num_heads, hidden, self.spec.unverified)
        stats.num_lookahead_rows = sum(s.num_lookahead for s in entries)
        stats.num_key_rows = sum((s.num_new_tokens + s.num_lookahead + (len(s.draft) if s.draft is not None else 0))
                                 * (s.request.num_cache_slots + s.num_new_tokens) for s in sched.scheduled)
        stats.num_key_loads = sum(s.request.num_cache_slots + s.num_new_tokens for s in sched.scheduled)
        moves = [accepted_path_moves(s, v.result) for s, v in zip(entries, verified)]
        padding = self.spec.kv_padding(entries, verified)
        self.scheduler.update_after_step(sched)
        outputs = []
        for s, v, (src, dst) in zip(entries, verified, moves):
            self._commit_accepted(s, v, src, dst, padding.get(s.request.request_id, 0))
            out = self._append_tokens(s.request, v.result.token_ids, v.logprobs)
            stats.num_generated_tokens += len(out.new_token_ids)
            stats.spec.append(SpecRecord(self.spec.method_of(s.request), v.result.num_draft, v.result.num_accepted))
            outputs.append(out)
        return outputs

    def _count_tokens(self, sched: SchedulerOutput, stats: StepStats) -> None:
        now = time.monotonic()
        for s in sched.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
            if s.request.num_computed_tokens >= s.request.num_prompt_tokens:
                stats.num_decode_tokens += s.num_new_tokens
            else:
                stats.num_prefill_tokens += s.num_new_tokens

    def _commit_accepted(self, s: ScheduledRequest, v: Verified, src: list[int], dst: list[int],
                         num_padding: int) -> None:
        """Keep the accepted drafts' K/V (moving a tree path into place) and roll back the rest, but
        for `num_padding` slots after them that stay as hidden padding (--spec-layout padded-kv)."""
        request, result = s.request, v.result
        if src:
            self.runner.copy_kv_slots([self.kv.slot(request, i) for i in src],
                                      [self.kv.slot(request, i) for i in dst])
        request.num_computed_tokens += result.num_accepted
        first = request.num_cache_slots
        request.kv_padding += range(first, first + num_padding)
        self.kv.rollback(request, request.num_cache_slots)
        request.spec_usage.draft_tokens += result.num_draft
        request.spec_usage.accepted_tokens += result.num_accepted
        self.spec.observe(s, v)

    def _append_tokens(self, request: Request, token_ids: list[int],
                       logprobs: list[TokenLogprob | None]) -> RequestOutput:
        """Append tokens one at a time, stopping at the first one that ends the request."""
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
        request.spec_usage.steps += 1
        text_state: OutputText = request.state["text"]
        new_ids, new_text, reason = [], [], None
        for token_id in token_ids:
            request.token_ids.append(token_id)
            new_ids.append(token_id)
            reason = self._stop_reason(request, token_id)
            if reason is None or reason == FinishReason.LENGTH:
                text, stopped = text_state.push(token_id)
                new_text.append(text)
                reason = FinishReason.STOP if stopped else reason
            if reason is not None:
                break
        new_logprobs = logprobs[:len(new_ids)] if request.sampling.logprobs is not None else None
        if reason is None:
            return RequestOutput(request.request_id, new_ids, "".join(new_text), request.num_prompt_tokens,
                                 request.num_output_tokens, new_logprobs, spec=replace(request.spec_usage))
        if not text_state.stopped:
            new_text.append(text_state.finish())
        self.scheduler.finish(request, reason)
        return self._final_output(request, reason, new_ids, "".join(new_text), new_logprobs)

    def _stop_reason(self, request: Request, token_id: int) -> FinishReason | None:
        sampling = request.sampling
        if token_id in sampling.stop_token_ids or (token_id in self.eos_token_ids and not sampling.ignore_eos):
            return FinishReason.STOP
        if request.num_output_tokens >= sampling.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # ------------------------------------------------------------ calibration

    def _calibration_rows(self) -> tuple[int, ...]:
        capacity = self.kv.num_free_blocks * self.kv.block_size
        return tuple(n for n in CALIBRATION_ROWS if n + 1 <= capacity) or (1,)

    def _head_row_share(self, rows: int = HEAD_CALIBRATION_ROWS, repeats: int = 3) -> float:
        """One BPD head row's cost in the cost curve's rows: what the heads add to a step of `rows`
        verify rows (rows x K head rows), against what one more row costs there by the curve. Rounds
        over both shapes, the fastest of each, as in StepCostModel.calibrate."""
        plain = with_heads = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self._forward_rows(rows)
            plain = min(plain, time.perf_counter() - start)
            start = time.perf_counter()
            self._forward_rows(rows, heads=True)
            with_heads = min(with_heads, time.perf_counter() - start)
        curve = self.spec.controller.cost_model
        row_cost = (curve.cost(2 * rows) - curve.cost(rows)) / rows
        if row_cost <= 0:
            return HEAD_ROW_SHARE
        return max(0.0, with_heads - plain) / (rows * self.spec.num_heads) / row_cost

    def _forward_rows(self, num_rows: int, context: int = 1, num_requests: int = 1, heads: bool = False) -> None:
        """One forward over num_requests x num_rows rows, all scored (a verify step's shape): each
        request a chain of drafts after `context` tokens in the cache (their K/V left as the cache
        holds them: only the time counts).

        A probe's first row is a generated token after a one-token prompt, as a decode row is: a
        prompt row would take the int8 dtypes' fp32 prompt path (engine/models/linear.py), which made
        every calibrated point 2-3x a real verify step's and kept the controller from drafting.
        heads: the BPD heads run on every scored row too."""
        probes = [Request(f"__calibration_{i}__", [0] * (context + 1), 1, SamplingParams(),
                          num_computed_tokens=context) for i in range(num_requests)]
        draft = DraftTree([0] * (num_rows - 1), list(range(-1, num_rows - 2))) if num_rows > 1 else None
        try:
            for probe in probes:
                self.kv.allocate(probe, context + num_rows)
            self.runner.execute(SchedulerOutput([ScheduledRequest(probe, 1, draft, draft_heads=heads)
                                                  for probe in probes]))
        finally:
            for probe in probes:
                self.kv.free(probe)

    # ------------------------------------------------------------ bookkeeping

    def _fail(self, request: Request, message: str) -> RequestOutput:
        log.error("request %s failed: %s", request.request_id, message)
        if not request.is_finished:
            self.scheduler.finish(request, FinishReason.ERROR)
        out = self._final_output(request, FinishReason.ERROR, [], "", None)
        out.error = message
        return out

    def _final_output(self, request: Request, reason: FinishReason, new_ids: list[int], new_text: str,
                      new_logprobs) -> RequestOutput:
        now = time.monotonic()
        scheduled = request.first_scheduled_time
        self._pending_finished.append(FinishedStats(
            finish_reason=reason, num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            queue_time=(scheduled if scheduled is not None else now) - request.arrival_time,
            ttft=None if request.first_token_time is None else request.first_token_time - request.arrival_time,
            e2e_latency=now - request.arrival_time, method=self.spec.method_of(request),
            spec=replace(request.spec_usage)))
        return RequestOutput(request.request_id, new_ids, new_text, request.num_prompt_tokens,
                             request.num_output_tokens, new_logprobs, finish_reason=reason,
                             spec=replace(request.spec_usage))

    def _finish_stats(self, stats: StepStats, step_time: float) -> None:
        stats.step_time = step_time
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.kv_cache_usage = self.kv.usage
        if stats.num_prefill_tokens == 0 and stats.spec:
            controller = self.spec.controller
            stats.speedup = controller.speedup(len(stats.spec), stats.num_generated_tokens, step_time,
                                               stats.num_key_loads)
            num_rows = stats.num_decode_tokens + sum(r.num_draft for r in stats.spec) + stats.num_lookahead_rows
            controller.cost_model.observe(num_rows, step_time, key_rows=stats.num_key_rows,
                                          key_loads=stats.num_key_loads)
        stats.finished, self._pending_finished = self._pending_finished, []
        self.last_stats = stats
