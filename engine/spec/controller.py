"""How many drafts each request verifies this step: measured step costs x measured acceptance.

On a GPU a verify step over 8x the rows costs about what a decode step costs, so speculation is
nearly free; on a 2-core CPU a forward over 2-16 rows costs ~1.3-2x one row (PLATFORM.md), so a
draft only pays when it is likely to be accepted. The controller therefore
- calibrates the step time by number of token rows at start-up (`StepCostModel`) and keeps
  learning it from every decode step (a start-up measurement disturbed by a noisy neighbour
  must not switch speculation off for the server's lifetime),
- keeps, per request, the acceptance probability of one more draft: alpha = accepted / (accepted +
  rejections), the maximum-likelihood estimate of a geometric acceptance run, started from the
  method's running average; a request with no record of its own, or one that has not verified a
  draft for EXPLORE_AFTER steps, is judged at least EXPLORE_ALPHA, so one bad category earlier in
  the server's life (creative writing for prompt lookup) cannot stop a translation request from
  ever finding out that its drafts are accepted; and when even that plans no draft for
  EXPLORE_AFTER plans running, an idle request verifies one draft anyway (a probe: at most one
  draft per EXPLORE_AFTER + 1 steps for the whole batch, the cost curve being the batch's):
  decode steps teach the cost curve only what one row costs, so a start-up calibration that caught
  a slow moment for 2+ rows (2 rows at 1.6-1.8x one row, where a quiet step costs ~1.1x) otherwise
  kept speculation off for the server's lifetime (seen here: prompt lookup never drafted again after
  a few plain requests),
- plans the step: the j-th draft of request i is accepted with probability alpha_i^j; over all
  proposed drafts, sorted by that gain, it keeps the prefix D that maximises the expected tokens per
  second (B + G(D)) / cost(R + D), where B is the number of decoding requests, G(D) the summed
  gains and R the step's rows without drafts. D = 0 (no speculation at all) is one of the options.
- and keeps only plans fair to every decoding request: request i's expected rate (1 + G_i(D)) /
  cost(R + D) stays at least FAIRNESS x its plain rate 1 / cost(R). Maximising the batch's tokens
  alone let requests with good drafts (code, translation) buy rows that requests without them
  (MT-bench chat) paid for in step time: 0.73-0.89x `none` for MT-bench at 8 and 16 clients
  (benchmarks/results/spec_cpu.txt). A request with no draft caps the step's cost at 1/FAIRNESS of
  a plain step, so on a CPU, where rows cost step time, a mixed batch drafts little; where rows are
  nearly free (a GPU) it drafts as before. (Measured after it: MT-bench still 0.85-0.92x at 8 and
  16 clients; the controller's own predictions say its plans are fair, so what is left is their
  error or something outside the plan: spec_cpu.txt, session 12. Those were closed loops, where the
  others' faster turnover also brings more prompts into its steps; with the same prompts arriving
  as an open loop it measured 0.93-1.19x: spec_cpu.txt, session 17.) `--spec-fairness` sets the share;
  0 turns the rule off, for more throughput (spec_cpu.txt, session 15). The default was 0.96 until
  shuffled, pooled runs showed its plans' error at 8 and 16 clients (QA, MT-bench or RAG at 0.88-0.947x
  in 7 of 12 method-runs); at 0.99 one of 12 did (0.94x, within the runs' noise: FAIRNESS below).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable

from engine.types import Request

CALIBRATION_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128)
"""Rows timed at start-up. 12 and 24 because a batch of 8 or 16 decoding requests prices its first
drafts on the curve just above those sizes, where it is steeper than the line to the next power of two:
on the dev CPU (fp32, session 27) the 9th row of a step cost 1.8-2.0 ms and the 17th 1.2-1.9 ms, where the
lines 8 -> 16 and 16 -> 32 said 1.2-1.3 ms."""
ATTENTION_CALIBRATION = (16, 512)  # rows, context keys: the attention term's start-up measurement
PRIOR_WEIGHT = 2.0  # pseudo-observations of the method's average behind each request's estimate
ONLINE_RATE = 0.1  # weight of one observed decode step in the cost curve
EXPLORE_ALPHA = 0.5  # the estimate a request is given when it has nothing of its own to go on
EXPLORE_AFTER = 8  # offers without a verified draft before a request retries; draftless plans before a probe
PROBE_PENDING = "probe_pending"  # request.state key: probed, nothing verified yet (DraftController._finish_probes)
# Default least expected rate, over its plain rate, a plan may leave any decoding request. 0.96 kept
# every Spec-Bench category of ngram and jacobi at >= 0.95x `none` in 5 of 12 pooled method-runs at 8
# and 16 clients (fp32); 0.99 did in 11 of 12 (three runs of each; the other at 0.94x), at 0.99-1.06x
# overall against 1.00-1.08x, but 1.10-1.13x at 4 clients against 1.14-1.16x (spec_cpu.txt,
# sessions 19 and 20).
FAIRNESS = 0.99


class StepCostModel:
    """Seconds per step: a piecewise-linear curve by number of token rows (calibrated at a context of
    one token: the linears, norms, sampling) plus attention: seconds_per_key_row x the step's (row,
    context key) pairs and seconds_per_key_load x the context keys its requests read (each request's
    keys leave memory once for all of its rows: specd_kernels/attention/cpu.c).

    Without the row term a draft row looked as cheap at 600 keys of context as at one, and online
    observations of verify steps inflated the whole curve instead: at 16 clients (fp32) the controller
    predicted verify steps 5% over plain ones that ran 30% over. Without the load term a decode row,
    whose request reads its keys for it alone, looked as cheap as a draft row reading them alongside
    its request's others: measured (fp32, 512 keys) 2.7 us per key row for 16 requests of one row and
    1.3 us for one request of 16 rows. Plain decode steps then ran ~9% over the prediction at 8
    clients, so the live speedup read ~0.93 for steps that drafted nothing (session 17)."""

    def __init__(self, points: dict[int, float] | None = None, seconds_per_key_row: float = 0.0,
                 seconds_per_key_load: float = 0.0):
        self.points = dict(points or {1: 1.0, 128: 1.0})  # flat until calibrated: rows look free
        self.seconds_per_key_row = seconds_per_key_row
        self.seconds_per_key_load = seconds_per_key_load

    def calibrate(self, run_rows: Callable[[int], None], rows=CALIBRATION_ROWS, repeats: int = 3) -> None:
        """Time `run_rows(n)` (one forward over n rows) and keep the fastest of `repeats` per n.

        The repeats are rounds over all n, not back-to-back runs of one n: a slow spell of a shared
        host (seconds long here) then inflates at most one sample of each n, not all of one n's."""
        run_rows(rows[0])  # warm-up: first-touch allocations are not the steady state
        points = {n: float("inf") for n in rows}
        for _ in range(repeats):
            for n in rows:
                start = time.perf_counter()
                run_rows(n)
                points[n] = min(points[n], time.perf_counter() - start)
        self.points = points
        self._make_monotonic()

    def calibrate_attention(self, run_rows: Callable[..., None], rows: int = 16, context: int = 512,
                            repeats: int = 3) -> None:
        """Both attention terms from two steps of `rows` rows over `context` keys each, against the
        curve's cost of those rows: one request of `rows` rows (`run_rows(rows, context)`: the keys read
        once) and `rows` requests of one row (`run_rows(1, context, rows)`: read `rows` times)."""
        shared = separate = float("inf")
        for _ in range(repeats):  # rounds over both shapes, as in calibrate
            start = time.perf_counter()
            run_rows(rows, context)
            shared = min(shared, time.perf_counter() - start)
            start = time.perf_counter()
            run_rows(1, context, rows)
            separate = min(separate, time.perf_counter() - start)
        key_rows = rows * context
        shared, separate = shared - self.cost(rows), separate - self.cost(rows)
        self.seconds_per_key_load = max(0.0, (separate - shared) / (key_rows - context))
        self.seconds_per_key_row = max(0.0, (shared - self.seconds_per_key_load * context) / key_rows)

    def attention(self, key_rows: float, key_loads: float = 0.0) -> float:
        return self.seconds_per_key_row * key_rows + self.seconds_per_key_load * key_loads

    def plain_step(self, num_requests: int, context_keys: float) -> float:
        """A plain decode step: one row per request, each reading its own context keys."""
        return self.cost(num_requests) + self.attention(context_keys, context_keys)

    def observe(self, num_rows: int, seconds: float, rate: float = ONLINE_RATE, key_rows: float = 0.0,
                key_loads: float = 0.0) -> None:
        """Move the curve toward a measured step (its attention terms taken out): the error is shared
        by the two neighbouring points in proportion to their interpolation weights (online least
        squares)."""
        xs = sorted(self.points)
        error = seconds - self.attention(key_rows, key_loads) - self.cost(num_rows)
        if num_rows <= xs[0] or num_rows >= xs[-1]:
            end = xs[0] if num_rows <= xs[0] else xs[-1]
            self.points[end] += rate * error
        else:
            i = bisect.bisect_left(xs, num_rows)
            x0, x1 = xs[i - 1], xs[i]
            w = (num_rows - x0) / (x1 - x0)
            self.points[x0] += rate * (1 - w) * error
            self.points[x1] += rate * w * error
        self._make_monotonic()

    def _make_monotonic(self) -> None:
        # A cost curve is non-decreasing in rows. Timing noise only ever slows a step, so a point
        # above a later one is a spike: lower it (the lower envelope) rather than raise the rest.
        running = float("inf")
        for n in sorted(self.points, reverse=True):
            running = min(running, self.points[n])
            self.points[n] = running

    def cost(self, num_rows: int) -> float:
        xs = sorted(self.points)
        if num_rows <= xs[0]:
            return self.points[xs[0]]
        if num_rows >= xs[-1]:
            if len(xs) == 1:
                return self.points[xs[0]]
            x0, x1 = xs[-2], xs[-1]
            slope = (self.points[x1] - self.points[x0]) / (x1 - x0)
            return self.points[x1] + slope * (num_rows - x1)
        i = bisect.bisect_left(xs, num_rows)
        x0, x1 = xs[i - 1], xs[i]
        t = (num_rows - x0) / (x1 - x0)
        return self.points[x0] + t * (self.points[x1] - self.points[x0])


@dataclass
class AcceptanceStats:
    """Accepted drafts and rejections (a step that stopped before its last draft) of one method."""

    accepted: float = 0.0
    rejections: float = 0.0

    def alpha(self, prior: float = 0.5) -> float:
        return (self.accepted + PRIOR_WEIGHT * prior) / (self.accepted + self.rejections + PRIOR_WEIGHT)

    def record(self, draft_depth: int, num_accepted: int) -> None:
        """draft_depth: the verified draft's deepest node (a chain's length). A tree's path cannot go
        past it, so accepting that deep is no rejection, however many siblings were passed over."""
        self.accepted += num_accepted
        self.rejections += 1 if num_accepted < draft_depth else 0


class DraftController:
    def __init__(self, cost_model: StepCostModel | None = None, adaptive: bool = True, fairness: float = FAIRNESS):
        self.cost_model = cost_model or StepCostModel()
        self.adaptive = adaptive
        """False: always verify every proposed draft (for measuring, and for tests)."""
        self.fairness = fairness
        """0: maximise the batch's tokens alone (--spec-fairness)."""
        self.method_stats: dict[str, AcceptanceStats] = {}
        self._plans_since_draft = 0  # plans in a row that verified no draft at all (probe pacing)

    def alpha(self, request: Request, method: str) -> float:
        prior = self.method_stats.setdefault(method, AcceptanceStats()).alpha()
        stats: AcceptanceStats | None = request.state.get("acceptance")
        if stats is None or request.state.get("draft_idle_steps", 0) >= EXPLORE_AFTER:
            return max(EXPLORE_ALPHA, stats.alpha(prior) if stats is not None else prior)
        return stats.alpha(prior)

    def record(self, request: Request, method: str, draft_depth: int, num_accepted: int) -> None:
        if draft_depth == 0:
            return
        request.state["draft_idle_steps"] = 0
        request.state.pop(PROBE_PENDING, None)
        request.state.setdefault("acceptance", AcceptanceStats()).record(draft_depth, num_accepted)
        self.method_stats.setdefault(method, AcceptanceStats()).record(draft_depth, num_accepted)

    def plan(self, proposals: dict[str, tuple], num_base_rows: int,
             rows_per_draft: dict[str, float] | None = None, base_key_rows: float = 0.0) -> dict[str, int]:
        """request_id -> drafts to keep, a prefix of each proposal; proposals hold (request, method,
        depth of each draft node[, weight of each node]). A node at depth d is worth weight x alpha^d
        tokens (weight 1 by default: a chain's); a tree's proposer weighs its branches (TR-Jacobi's
        node_weights), and a node is never worth more than the node before it, since only prefixes are
        kept.

        num_base_rows: the step's decoding requests, with or without proposals (one row each), and
        base_key_rows the context keys their rows attend to (each request reads its own). A draft row
        attends to its request's keys, read once for all of the request's rows.
        rows_per_draft: request_id -> rows one of its drafts costs (default 1; a PaSS draft not yet
        made pays a look-ahead row too: the proposer's `rows_per_draft`).
        """
        if not self.adaptive:
            return {rid: len(entry[2]) for rid, entry in proposals.items()}
        gains = self._node_gains(proposals, rows_per_draft or {})
        best_count = self._best_prefix(gains, num_base_rows, base_key_rows, len(proposals))
        keep: dict[str, int] = {}
        for _, _, rid, _ in gains[:best_count]:
            keep[rid] = keep.get(rid, 0) + 1
        self._finish_probes(proposals, keep)
        self._plans_since_draft = 0 if keep else self._plans_since_draft + 1
        if self._plans_since_draft > EXPLORE_AFTER:  # a probe: the curve learns only from rows it sees
            probe = next((rid for _, _, rid, _ in gains
                          if proposals[rid][0].state.get("draft_idle_steps", 0) >= EXPLORE_AFTER), None)
            if probe is not None:
                keep[probe] = 1
                proposals[probe][0].state[PROBE_PENDING] = True
                self._plans_since_draft = 0
        # Idle steps end when drafts are verified (record), not when they are planned. A PaSS
        # two_call retry plans a drafting step (look-ahead rows, nothing verified), and its drafts
        # come up for validation the step after; that must still count as the retry. When the reset
        # was here, the retry's boost was gone by the validation, which the controller then refused:
        # 1 in 126 plans of a request verified anything, while every ~9th step paid for a look-ahead
        # row (session 15).
        for rid, (request, *_) in proposals.items():
            if rid not in keep:
                request.state["draft_idle_steps"] = request.state.get("draft_idle_steps", 0) + 1
        return keep

    @staticmethod
    def _finish_probes(proposals: dict[str, tuple], keep: dict[str, int]) -> None:
        """A probe whose request had no drafts yet (PaSS two_call, BPD) paid for drafting them: verify
        one of them now, or the probe teaches nothing. Left to the plan, which judges them as before,
        the validation was refused at 8 clients in int8, so every probe cost a look-ahead row and
        nothing was ever verified. A probe verified in its own step was recorded, which ends it."""
        for rid, (request, *_) in proposals.items():
            if request.state.pop(PROBE_PENDING, False):
                keep[rid] = max(keep.get(rid, 0), 1)

    def _node_gains(self, proposals: dict[str, tuple], rows_per_draft: dict[str, float]) -> list[tuple]:
        """(expected tokens, rows, request_id, context keys its rows read) per proposed node, best
        tokens per row first; each request's nodes in proposal order, non-increasing."""
        gains = []
        for rid, (request, method, depths, *optional) in proposals.items():
            alpha = self.alpha(request, method)
            rows = rows_per_draft.get(rid, 1.0)
            node_weights = optional[0] if optional and optional[0] is not None else [1.0] * len(depths)
            gain = float("inf")
            for depth, weight in zip(depths, node_weights):
                gain = min(gain, weight * alpha ** depth)
                gains.append((gain, rows, rid, rows * request.num_tokens))
        gains.sort(key=lambda g: -g[0] / g[1])  # stable: a request's nodes keep their order
        return gains

    def _best_prefix(self, gains: list[tuple], num_base_rows: int, base_key_rows: float,
                     num_proposals: int) -> int:
        """How many of `gains` (best first) give the most expected tokens per second, among the
        prefixes that leave every decoding request at least fairness x its plain rate; 0: no drafts."""
        model = self.cost_model
        base_cost = model.plain_step(num_base_rows, base_key_rows)
        best_count, best_rate = 0, num_base_rows / base_cost
        total_gain = total_rows = key_rows = 0.0
        request_gain: dict[str, float] = {}  # expected gain of each request kept so far
        without_drafts = max(num_base_rows, num_proposals)  # decoding requests given no draft yet
        for count, (gain, rows, rid, draft_key_rows) in enumerate(gains, start=1):
            total_gain += gain
            total_rows += rows
            key_rows += draft_key_rows
            without_drafts -= rid not in request_gain
            request_gain[rid] = request_gain.get(rid, 0.0) + gain
            cost = model.cost(num_base_rows + total_rows) + model.attention(base_key_rows + key_rows, base_key_rows)
            least_gain = 0.0 if without_drafts else min(request_gain.values())
            if (1.0 + least_gain) * base_cost < self.fairness * cost:
                continue  # some request would decode slower than fairness x plain
            rate = (num_base_rows + total_gain) / cost
            if rate > best_rate:
                best_count, best_rate = count, rate
        return best_count

    def speedup(self, num_decode_requests: int, num_emitted: int, step_time: float,
                context_keys: float = 0.0) -> float | None:
        """Tokens/s this step / tokens/s a plain decode step of the same batch would give (calibrated);
        context_keys: the keys the requests' rows read (their attention in a plain step)."""
        if num_decode_requests == 0 or step_time <= 0:
            return None
        plain_rate = num_decode_requests / self.cost_model.plain_step(num_decode_requests, context_keys)
        return (num_emitted / step_time) / plain_rate
