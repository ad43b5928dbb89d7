"""The one place that builds tensors: a SchedulerOutput becomes one flat ragged batch.

Every scheduled request contributes its new tokens (prefill, a prefill chunk or one decode token)
and, when it carries a draft, the draft nodes right after them, all back to back without padding
(EMS-SD). Draft node j of a request sits at cache index num_computed + num_new + j (its slot) but at
RoPE position last_position + depth(j), and sees the context, the new tokens and its own ancestors
through a per-request tree mask; a chain draft needs no mask (it is plain causal).

Logits are computed only for the rows that sample: the last new token of each request that reaches
the end of its known tokens, plus every draft node (the verifier scores those).
PaSS look-ahead rows (`ScheduledRequest.num_lookahead`) come last in a request's share: their input
is a learned embedding instead of a token, they continue the chain's positions and cache indices
(causal, like a chain), and their logits are returned apart (`ModelOutput.lookahead_logits`).
A request with `draft_heads` (BPD, engine/spec/bpd.py) also gets the heads' K rows for each of its
sampled rows, computed from their hidden states (`ModelOutput.head_logits`, no extra input rows).
The runner never mutates requests; the engine advances num_computed_tokens after the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import CacheConfig, ModelConfig
from engine.models.int8 import SPLIT_SHARES
from engine.models.llama import ACTIVATION_DTYPES, TORCH_DTYPES, AttentionMetadata, LlamaModel
from engine.spec.bpd import DraftHeads
from engine.types import DraftTree, ModelOutput, ScheduledRequest, SchedulerOutput
from specd_kernels.attention import plan_attention
from specd_kernels.kv_cache_ops import copy_slots
from specd_kernels.rope.cpu import kv_half_supported


def kv_cache_dtype(requested: str, dtype: str, device: torch.device) -> torch.dtype:
    """The K/V cache's torch dtype for --kv-cache-dtype `requested` under --dtype `dtype`.

    auto: fp16 for the int8 dtypes on a CPU whose C kernels convert it (F16C). Why: half the cache's
    memory and of the bytes attention reads, which the int8 dtypes' quality bar still meets (README).
    On a 2-core Intel guest 16 decoding requests took 84-86 ms per step at context 1200 against 92-94
    in fp32, 54-56 against 57-58 at 400, batch 1 the same (benchmarks/forward_cost.py, session 11,
    when the C attention converted fp16 keys into scratch first); since it reads them in place, their
    attention at 400 keys takes 255 us per layer against 461 in fp32 (session 12). fp32 elsewhere
    keeps --dtype fp32 token-identical to HF transformers; other activation dtypes keep theirs.
    """
    activations = ACTIVATION_DTYPES[dtype]
    if requested == "auto":
        if dtype in SPLIT_SHARES and device.type == "cpu" and kv_half_supported():
            return torch.float16
        return activations
    chosen = TORCH_DTYPES[requested]
    if chosen != activations and activations != torch.float32:
        raise ValueError(f"--kv-cache-dtype {requested} needs fp32 activations (--dtype fp32 or an int8 dtype)")
    return chosen


@dataclass
class RequestLayout:
    """One request's rows in the step's flat batch (plain Python, so it is cheap to test)."""

    token_ids: list[int]
    positions: list[int]  # RoPE positions
    cache_indices: list[int]  # index in the request's KV sequence (slot = block table lookup of it)
    kv_len: int  # the request's KV length once this step's K/V are stored
    sample_rows: list[int] = field(default_factory=list)  # rows (relative) whose logits are returned
    tree_block: list[list[bool]] | None = None  # [q_len][q_len] visibility among the new rows; None: causal
    lookahead_rows: list[int] = field(default_factory=list)  # rows (relative) fed look-ahead embeddings


def _draft_depths(draft: DraftTree) -> list[int]:
    depths = []
    for j, parent in enumerate(draft.parents):
        if parent >= j:
            raise ValueError(f"draft node {j} has parent {parent}; parents must come first")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def _tree_block(num_new: int, draft: DraftTree) -> list[list[bool]] | None:
    """Visibility among [new tokens + draft nodes]: new tokens causal; a node sees them and its ancestors."""
    if all(p == j - 1 for j, p in enumerate(draft.parents)):
        return None  # a chain is plain causal
    size = num_new + len(draft)
    block = [[k <= j for k in range(size)] for j in range(num_new)]
    for j, parent in enumerate(draft.parents):
        row = list(block[num_new + parent]) if parent >= 0 else [True] * num_new + [False] * len(draft)
        row[num_new + j] = True
        block.append(row)
    return block


def request_layout(s: ScheduledRequest) -> RequestLayout:
    """Token ids, positions and cache indices of one request's share of a step."""
    r = s.request
    start, num_new = r.num_computed_tokens, s.num_new_tokens
    if num_new < 0 or start + num_new > r.num_tokens:
        raise ValueError(f"request {r.request_id}: cannot compute tokens {start}..{start + num_new}")
    token_ids = r.token_ids[start : start + num_new]
    positions = list(range(start, start + num_new))
    first = r.num_cache_slots  # past any padding slots: a token's cache index may exceed its position
    layout = RequestLayout(token_ids, positions, list(range(first, first + num_new)), first + num_new)
    if not s.samples:
        return layout
    if num_new == 0:
        raise ValueError(f"request {r.request_id}: a sampling step needs at least one new token")
    layout.sample_rows = [num_new - 1]
    draft = s.draft
    if draft is not None and len(draft) > 0:
        num_draft = len(draft)
        layout.token_ids = token_ids + list(draft.token_ids)
        layout.positions = positions + [start + num_new - 1 + d for d in _draft_depths(draft)]
        layout.cache_indices = list(range(first, first + num_new + num_draft))
        layout.kv_len = first + num_new + num_draft
        layout.sample_rows += list(range(num_new, num_new + num_draft))
        layout.tree_block = _tree_block(num_new, draft)
    if s.num_lookahead > 0:
        _append_lookahead(layout, s.num_lookahead, r.request_id, s.lookahead_from_root)
    return layout


def _append_lookahead(layout: RequestLayout, num_lookahead: int, request_id: str, from_root: bool = False) -> None:
    """Look-ahead rows after the last row (causal), or with from_root after the last real token's row,
    beside the draft chain (a branch: they see neither the drafts nor are seen by them). Either way
    their cache indices come after every other row's, so rolling back the drafts drops them too."""
    if layout.tree_block is not None:
        raise ValueError(f"request {request_id}: look-ahead rows need a chain draft, not a tree")
    num_rows = len(layout.token_ids)
    parent = layout.sample_rows[0] if from_root else num_rows - 1
    first_position, last_index = layout.positions[parent] + 1, layout.cache_indices[-1]
    layout.token_ids = layout.token_ids + [0] * num_lookahead  # placeholder ids: the embeddings replace them
    layout.positions = layout.positions + list(range(first_position, first_position + num_lookahead))
    layout.cache_indices = layout.cache_indices + list(range(last_index + 1, last_index + 1 + num_lookahead))
    layout.kv_len += num_lookahead
    layout.lookahead_rows = list(range(num_rows, num_rows + num_lookahead))
    if parent < num_rows - 1:  # beside drafts: row j of the branch sees the rows up to the parent and itself
        size = num_rows + num_lookahead
        layout.tree_block = ([[k <= j for k in range(size)] for j in range(num_rows)]
                             + [[k <= parent or num_rows <= k <= j for k in range(size)]
                                for j in range(num_rows, size)])


def _merge_outputs(scheduled: list[ScheduledRequest], groups: list[list[ScheduledRequest]],
                   outs: list[ModelOutput], num_heads: int = 0) -> ModelOutput:
    """The groups' outputs back in scheduled order: each request's sample rows (1 + its drafts when
    it samples), look-ahead rows and head rows (num_heads per sample row) sit together in its
    group's output."""
    where = {}  # request id -> (group, first row and row count of: sample rows, look-ahead rows, head rows)
    for g, group in enumerate(groups):
        row = lookahead = head = 0
        for s in group:
            lay = request_layout(s)
            num_head = len(lay.sample_rows) * num_heads if s.draft_heads else 0
            where[s.request.request_id] = (g, row, len(lay.sample_rows), lookahead, len(lay.lookahead_rows),
                                           head, num_head)
            row += len(lay.sample_rows)
            lookahead += len(lay.lookahead_rows)
            head += num_head
    logits, hidden, lookahead_logits, head_logits = [], [], [], []
    for s in scheduled:
        g, row, num_rows, lookahead, num_lookahead, head, num_head = where[s.request.request_id]
        logits.append(outs[g].logits[row : row + num_rows])
        hidden.append(outs[g].hidden_states[row : row + num_rows])
        if num_lookahead:
            lookahead_logits.append(outs[g].lookahead_logits[lookahead : lookahead + num_lookahead])
        if num_head:
            head_logits.append(outs[g].head_logits[head : head + num_head])
    return ModelOutput(logits=torch.cat(logits), hidden_states=torch.cat(hidden),
                       lookahead_logits=torch.cat(lookahead_logits) if lookahead_logits else None,
                       head_logits=torch.cat(head_logits) if head_logits else None)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sample_rows] int64 flat rows whose logits are returned
    lookahead_rows: torch.Tensor | None = None  # [num_lookahead_rows] int64 flat rows fed look-ahead embeddings
    lookahead_embeds: torch.Tensor | None = None  # [num_lookahead_rows, hidden]
    head_rows: torch.Tensor | None = None  # [n] int64 indices into the sampled rows that get the BPD heads


class ModelRunner:
    """Owns the model weights and the KV cache tensors; turns a schedule into logits."""

    def __init__(self, model_config: ModelConfig, model_dir: Path, cache_config: CacheConfig,
                 device: str = "cpu", dtype: str = "fp32", linear_backend: str = "auto"):
        self.model_config = model_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = ACTIVATION_DTYPES[dtype]  # torch.dtype of weights and activations
        self.kv_dtype = kv_cache_dtype(cache_config.dtype, dtype, self.device)
        self.model = LlamaModel.from_hf_dir(model_dir, model_config, device, dtype, linear_backend)
        self.lookahead: torch.Tensor | None = None  # [L, hidden] PaSS embeddings (set_lookahead)
        self.heads: DraftHeads | None = None  # BPD heads (set_heads)
        shape = (cache_config.num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        # Zeroed, not empty: padded attention reads unused slots under a mask and needs them finite.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(model_config.num_layers)
        ]

    # ------------------------------------------------------------------ public

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        """Run one step; logits # [num_sample_rows, vocab] fp32 in scheduled order.

        With the int8 dtypes' prompt rows on their own path, a step that mixes prompt chunks with
        decoding or verification runs as two forwards: the requests with prompt rows, then the rest.
        Why: one forward over both splits every linear layer by row (index_select/index_copy) and
        keeps the decoding rows on the layer-by-op path; on its own their forward takes the fused
        int8 layers (engine/models/int8_layers.py). Requests never see each other's rows, and every
        row keeps its bits either way (its path depends on its token's role alone), so the step's
        output is the same."""
        groups = self._split_by_prompt_rows(sched.scheduled)
        if len(groups) == 1:
            return self._forward(sched)
        outs = [self._forward(SchedulerOutput(group)) for group in groups]
        return _merge_outputs(sched.scheduled, groups, outs, self.heads.num_heads if self.heads is not None else 0)

    def _split_by_prompt_rows(self, scheduled: list[ScheduledRequest]) -> list[list[ScheduledRequest]]:
        """[scheduled], or [requests with prompt rows, the others] when the model routes prompt rows
        apart and the step has both."""
        if not self.model.prompt_rows_dense:
            return [scheduled]
        prompt = [s for s in scheduled if s.request.num_computed_tokens < s.request.num_prompt_tokens]
        if not prompt or len(prompt) == len(scheduled):
            return [scheduled]
        return [prompt, [s for s in scheduled if s.request.num_computed_tokens >= s.request.num_prompt_tokens]]

    def _forward(self, sched: SchedulerOutput) -> ModelOutput:
        inputs = self.prepare_inputs(sched)
        if inputs.input_ids.numel() == 0:
            empty = torch.empty(0, self.model_config.vocab_size, device=self.device)
            return ModelOutput(logits=empty, hidden_states=empty[:, : self.model_config.hidden_size])
        overrides = None
        if inputs.lookahead_rows is not None:
            overrides = (inputs.lookahead_rows, inputs.lookahead_embeds)
        hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, self.kv_caches,
                                    overrides)
        sampled = hidden.index_select(0, inputs.sample_rows)  # [num_sample_rows, hidden]
        # One logits call for every kind of row: each call reads the whole lm_head (113 MB in fp32).
        # With a second call a PaSS step's forward ran 8% over a plain step's, 2-5% without (fp32, batch 1).
        # Every row's logits are its own, whatever rows come with it.
        rows = [sampled]
        if inputs.lookahead_rows is not None:
            rows.append(hidden.index_select(0, inputs.lookahead_rows))
        if inputs.head_rows is not None:
            rows.append(self.heads.apply(sampled.index_select(0, inputs.head_rows)))
        logits = self.model.compute_logits(torch.cat(rows) if len(rows) > 1 else sampled)
        sizes = [r.shape[0] for r in rows]
        parts = iter(logits.split(sizes))
        out = ModelOutput(logits=next(parts), hidden_states=sampled)
        if inputs.lookahead_rows is not None:
            out.lookahead_logits = next(parts)
        if inputs.head_rows is not None:
            out.head_logits = next(parts)
        return out

    def set_lookahead(self, embeds: torch.Tensor | None) -> None:
        """The PaSS look-ahead embeddings # [L, hidden]; a request's i-th look-ahead row gets row i."""
        if embeds is not None and (embeds.dim() != 2 or embeds.shape[1] != self.model_config.hidden_size):
            raise ValueError(f"look-ahead embeddings must be [L, {self.model_config.hidden_size}], "
                             f"got {tuple(embeds.shape)}")
        self.lookahead = None if embeds is None else embeds.to(self.device, self.dtype)

    def set_heads(self, heads: DraftHeads | None) -> None:
        """The BPD heads applied to the sampled rows of requests with `draft_heads`."""
        if heads is not None and heads.hidden_size != self.model_config.hidden_size:
            raise ValueError(f"BPD heads are for hidden size {heads.hidden_size}, the model's is "
                             f"{self.model_config.hidden_size}")
        self.heads = None if heads is None else heads.to(self.device, self.dtype)

    def copy_kv_slots(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy K/V between flat slots in every layer (compacting an accepted tree path)."""
        if not src_slots:
            return
        src = torch.tensor(src_slots, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst_slots, dtype=torch.long, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            copy_slots(k_cache, v_cache, src, dst)

    # ------------------------------------------------------------------ tensor building

    def prepare_inputs(self, sched: SchedulerOutput) -> StepInputs:
        layouts = [request_layout(s) for s in sched.scheduled]
        self._check_capacity(sched.scheduled, layouts)
        flat_ids, flat_pos, flat_idx, req_of_token, sample_rows, cu_q = [], [], [], [], [], [0]
        lookahead_rows, lookahead_counts, prompt_rows, prompt_counts, head_rows = [], [], [], [], []
        for i, (s, lay) in enumerate(zip(sched.scheduled, layouts)):
            # a request's prompt tokens lead its new rows (a recomputed request: prompt, then output)
            is_prompt = [index < s.request.num_prompt_tokens for index in lay.cache_indices]
            prompt_counts.append(sum(is_prompt))
            if self.model.prompt_rows_dense:
                prompt_rows += is_prompt
            if s.draft_heads:  # indices into the sampled rows
                head_rows += range(len(sample_rows), len(sample_rows) + len(lay.sample_rows))
            sample_rows += [cu_q[-1] + row for row in lay.sample_rows]
            lookahead_rows += [cu_q[-1] + row for row in lay.lookahead_rows]
            lookahead_counts.append(len(lay.lookahead_rows))
            flat_ids += lay.token_ids
            flat_pos += lay.positions
            flat_idx += lay.cache_indices
            req_of_token += [i] * len(lay.token_ids)
            cu_q.append(cu_q[-1] + len(lay.token_ids))
        block_tables = self._block_tables(sched.scheduled, layouts)
        bs = self.block_size
        idx = torch.tensor(flat_idx, dtype=torch.long)
        slots = block_tables.long()[torch.tensor(req_of_token, dtype=torch.long), idx // bs] * bs + idx % bs
        tree_mask, cu_tree = self._tree_masks(layouts)
        cu_seqlens_q = torch.tensor(cu_q, dtype=torch.int32)
        kv_lens = torch.tensor([lay.kv_len for lay in layouts], dtype=torch.int32)
        dev = self.device
        to = lambda t: None if t is None else t.to(dev)  # noqa: E731
        meta = AttentionMetadata(to(slots), to(cu_seqlens_q), to(kv_lens), to(block_tables), to(tree_mask), to(cu_tree))
        if any(prompt_rows):
            meta.prompt_rows = torch.tensor(prompt_rows, dtype=torch.bool, device=dev)
        cfg = self.model_config
        meta.plan = plan_attention(meta.cu_seqlens_q, meta.kv_lens, meta.block_tables, bs,
                                   cfg.num_heads // cfg.num_kv_heads, meta.tree_mask, meta.cu_tree_mask,
                                   row_exact=self.dtype == torch.float32,  # the C kernel (fp32 and int8)
                                   prompt_rows=prompt_counts, hidden_keys=to(self._hidden_keys(sched.scheduled, layouts)))
        inputs = StepInputs(
            input_ids=torch.tensor(flat_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(flat_pos, dtype=torch.long, device=dev),
            attn_metadata=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=dev),
        )
        if head_rows:
            if self.heads is None:
                raise ValueError("a request asks for BPD head rows; no heads are loaded")
            inputs.head_rows = torch.tensor(head_rows, dtype=torch.long, device=dev)
        if lookahead_rows:
            inputs.lookahead_rows = torch.tensor(lookahead_rows, dtype=torch.long, device=dev)
            inputs.lookahead_embeds = self._lookahead_embeds(lookahead_counts)
        return inputs

    def _lookahead_embeds(self, counts: list[int]) -> torch.Tensor:
        """Request i's look-ahead rows get embeddings 0 .. counts[i] - 1, concatenated."""
        if self.lookahead is None or max(counts) > self.lookahead.shape[0]:
            have = 0 if self.lookahead is None else self.lookahead.shape[0]
            raise ValueError(f"a request asks for {max(counts)} look-ahead rows; {have} embeddings are loaded")
        index = torch.tensor([j for n in counts for j in range(n)], dtype=torch.long, device=self.device)
        return self.lookahead.index_select(0, index)

    def _check_capacity(self, scheduled: list[ScheduledRequest], layouts: list[RequestLayout]) -> None:
        max_pos = self.model_config.max_position_embeddings
        for s, lay in zip(scheduled, layouts):
            if len(s.request.block_ids) * self.block_size < lay.kv_len:
                raise ValueError(f"request {s.request.request_id}: {len(s.request.block_ids)} blocks "
                                 f"cannot hold {lay.kv_len} tokens")
            if lay.positions and max(lay.positions) >= max_pos:
                raise ValueError(f"request {s.request.request_id}: position beyond {max_pos}")

    @staticmethod
    def _hidden_keys(scheduled: list[ScheduledRequest], layouts: list[RequestLayout]) -> torch.Tensor | None:
        """[batch, max kv_len] bool: the padding slots of --spec-layout padded-kv (None without any)."""
        if not any(s.request.kv_padding for s in scheduled):
            return None
        hidden = torch.zeros(len(layouts), max(lay.kv_len for lay in layouts), dtype=torch.bool)
        for i, s in enumerate(scheduled):
            if s.request.kv_padding:
                hidden[i, torch.tensor(s.request.kv_padding, dtype=torch.long)] = True
        return hidden

    def _block_tables(self, scheduled, layouts) -> torch.Tensor:
        """[batch, max_blocks] int32: only the blocks each request's kv_len touches, padded with 0."""
        needed = [-(-lay.kv_len // self.block_size) for lay in layouts]
        width = max(needed + [1])
        rows = [list(s.request.block_ids[:n]) + [0] * (width - n) for s, n in zip(scheduled, needed)]
        return torch.tensor(rows, dtype=torch.int32).view(len(layouts), width)

    @staticmethod
    def _tree_masks(layouts: list[RequestLayout]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flat concatenated tree blocks + offsets [batch + 1], or (None, None) when no request has one."""
        if all(lay.tree_block is None for lay in layouts):
            return None, None
        blocks, cu = [], [0]
        for lay in layouts:
            if lay.tree_block is not None:
                blocks.append(torch.tensor(lay.tree_block, dtype=torch.bool).reshape(-1))
            cu.append(cu[-1] + (len(lay.token_ids) ** 2 if lay.tree_block is not None else 0))
        return torch.cat(blocks), torch.tensor(cu, dtype=torch.int64)
