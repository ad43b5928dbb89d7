"""Every object passed between specd's modules (see DESIGN.md, "Objects between modules").

This module is pure Python (no torch) so that the HTTP server can import it.
Tensor-carrying objects (`ModelOutput`) annotate tensors as `Any` for the same reason.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

# ---------------------------------------------------------------- request parameters


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens, and when it stops."""

    max_tokens: int = 16
    """Upper bound on generated tokens (the server clips it to the context window)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    seed: int | None = None
    """Same seed => same tokens, whatever else runs in the batch."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    """Stop strings; the matched text is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; N >= 0: the sampled token's logprob plus the top-N alternatives."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpecParams:
    """Per-request speculation override; None fields fall back to the server's --spec."""

    method: str | None = None
    num_draft_tokens: int | None = None


@dataclass
class EngineRequest:
    """What the server submits to the engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpecParams = field(default_factory=SpecParams)
    arrival_time: float = field(default_factory=time.monotonic)


# ---------------------------------------------------------------- scheduler state


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"  # client went away or the server is shutting down
    ERROR = "error"  # the engine failed this request (it is reported, never lost)


@dataclass
class DraftTree:
    """Draft tokens proposed for one request (issue 3 fills it; a chain is a tree with one child per node).

    parents[i] is the index of node i's parent, -1 for a child of the last real token.
    """

    token_ids: list[int]
    parents: list[int]
    draft_probs: Any = None  # optional [num_nodes, vocab] q for stochastic acceptance

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class SpecUsage:
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per step, the bonus token included (1.0 without speculation)."""
        return (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0


@dataclass
class Request:
    """The engine's state of one request; only the scheduler and the engine mutate it."""

    request_id: str
    token_ids: list[int]
    """prompt + generated tokens (drafts are not in here)."""
    num_prompt_tokens: int
    sampling: SamplingParams
    spec: SpecParams = field(default_factory=SpecParams)
    arrival_time: float = field(default_factory=time.monotonic)
    num_computed_tokens: int = 0
    """How many leading token_ids have their K/V in the cache."""
    kv_padding: list[int] = field(default_factory=list)
    """Cache indices of padding slots, hidden from attention (only --spec-layout padded-kv makes them:
    EMS-SD's vanilla baseline keeps every request's cache as long as the batch's best acceptance)."""
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    draft: DraftTree | None = None
    num_preemptions: int = 0
    spec_usage: SpecUsage = field(default_factory=SpecUsage)
    """Running totals of this request's speculation (steps that emitted tokens, drafts, accepted)."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    state: dict = field(default_factory=dict)
    """Per-request state owned by other modules (sampler generator, detokenizer, proposer index)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_cache_slots(self) -> int:
        """Cache indices in use: the computed tokens' K/V plus any padding slots between them."""
        return self.num_computed_tokens + len(self.kv_padding)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class ScheduledRequest:
    """One request's share of a step: compute token_ids[num_computed_tokens : +num_new_tokens]."""

    request: Request
    num_new_tokens: int
    draft: DraftTree | None = None
    """Draft nodes verified after the new tokens (the proposer fills it, up to max_draft_tokens)."""
    max_draft_tokens: int = 0
    """Draft slots the scheduler reserved in the token budget and the KV cache for this step."""
    num_lookahead: int = 0
    """PaSS look-ahead rows appended after the draft (they use reserved draft slots; engine/spec/lookahead.py)."""
    lookahead_from_root: bool = False
    """The look-ahead rows continue the last real token, beside the draft, not after it (--pass-mode branch)."""
    draft_heads: bool = False
    """Apply the BPD heads to every sampled row of this request (engine/spec/bpd.py; no slots)."""

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so its last row is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens + (len(s.draft) if s.draft else 0) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# ---------------------------------------------------------------- model / verifier


@dataclass
class ModelOutput:
    """Runner output: logits for the rows that sample, in the order of the sampling requests."""

    logits: Any  # torch.Tensor [num_sample_rows, vocab_size], fp32
    hidden_states: Any = None  # torch.Tensor [num_sample_rows, hidden_size] when a proposer needs it
    lookahead_logits: Any = None  # torch.Tensor [sum of num_lookahead, vocab_size] fp32, scheduled order
    head_logits: Any = None  # torch.Tensor [sum over draft_heads requests of sample rows x K, vocab] fp32


@dataclass
class VerifyResult:
    """Per request: the accepted drafts and the bonus/recovered token (issue 3)."""

    request_id: str
    token_ids: list[int]
    num_draft: int
    num_accepted: int
    accepted_nodes: list[int] = field(default_factory=list)
    """The accepted draft nodes, root to leaf (len == num_accepted); token_ids[i] was produced at
    verify row ([0] + [node + 1 for node in accepted_nodes])[i] (see engine/verifier.py)."""


# ---------------------------------------------------------------- engine -> server


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """The top-N (token_id, logprob) alternatives, most likely first."""


@dataclass
class RequestOutput:
    """A delta for one request: the tokens and text produced since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    spec: SpecUsage = field(default_factory=SpecUsage)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SpecRecord:
    """One request's verification in a step (num_draft 0: it decoded plainly)."""

    method: str
    num_draft: int
    num_accepted: int


@dataclass
class StepStats:
    """What one engine step did; the metrics exporter maps it to Prometheus."""

    step_time: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    batch_size: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_generated_tokens: int = 0
    num_lookahead_rows: int = 0
    """PaSS look-ahead rows computed this step (rows that neither decode nor verify)."""
    num_key_rows: int = 0
    """(row, context key) pairs the step's attention computed: the draft controller's attention term."""
    num_key_loads: int = 0
    """Context keys the step's requests read (each request's once for all its rows): the other term."""
    num_preemptions: int = 0
    kv_cache_usage: float = 0.0
    spec: list[SpecRecord] = field(default_factory=list)
    speedup: float | None = None
    """Tokens/s of this decode-only step over what plain decoding gives at this batch size (calibrated)."""
    finished: list["FinishedStats"] = field(default_factory=list)


@dataclass
class FinishedStats:
    """Latency figures of a request that finished this step."""

    finish_reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    queue_time: float
    ttft: float | None
    e2e_latency: float
    method: str = "none"
    spec: SpecUsage = field(default_factory=SpecUsage)
