"""Logits -> next tokens: logit_bias, presence/frequency penalties, temperature, top-k, top-p, seeds, logprobs.

The work is split into row-wise phases so that speculative verification (issue 3) can reuse them on
several rows of one request, each row with its own params and its own output history:

    logits = apply_logit_processors(logits, rows_params, rows_output_ids)   # bias + penalties
    probs  = probs_from_logits(logits, rows_params)                          # temperature, top-k, top-p
    tokens = sample_from_probs(probs, generators)                            # per-row torch.Generator

The engine calls these through engine/verify_step.py's `verify_step` only: a request without
drafts is a zero-node draft tree, so plain decoding and speculation share one code path.

Sampling is inverse-CDF with one uniform per row drawn from that row's generator: an exact sample
of p up to float rounding, and on CPU far cheaper than the exponential race (argmax p / E), which
needs a whole Exp(1) noise vector per row. A request's generator lives in
`request.state["generator"]`, so a seeded request gives the same tokens whatever else is batched
with it and whatever row it lands on.

Logprobs are those of the model's raw distribution (log_softmax of the unmodified logits), before
bias, penalties, temperature and truncation, as vLLM returns them by default: they describe what the
model thinks, and stay comparable across requests with different sampling settings.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from engine.types import Request, SamplingParams, TokenLogprob

_SEED_SOURCE = random.SystemRandom()
MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5
_CDF_BLOCK = 256


# ---------------------------------------------------------------- generators


def get_generator(request: Request) -> torch.Generator:
    """The request's own CPU generator, created on first use (seeded by `sampling.seed` if given).

    It stays on the CPU whatever the logits' device: sampling draws one number per row from it,
    and a seed then gives the same stream on every device.
    """
    gen = request.state.get("generator")
    if gen is None:
        seed = request.sampling.seed
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else _SEED_SOURCE.getrandbits(63))
        request.state["generator"] = gen
    return gen


# ---------------------------------------------------------------- logit processors


def _needs_processing(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_logit_processors(
    logits: torch.Tensor,  # [num_rows, vocab_size]
    rows_params: Sequence[SamplingParams],
    rows_output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Add logit_bias and subtract OpenAI presence/frequency penalties; returns a new tensor when it changes.

    Penalties count the row's generated tokens only (not the prompt), as OpenAI defines them:
    logit[t] -= presence * (count[t] > 0) + frequency * count[t].
    """
    if not any(_needs_processing(p) for p in rows_params):
        return logits
    logits = logits.clone()
    _apply_penalties(logits, rows_params, rows_output_ids)
    _apply_logit_bias(logits, rows_params)
    return logits


def _apply_penalties(logits, rows_params, rows_output_ids) -> None:
    # Sparse: only (row, token) pairs that occurred are touched, never a dense [rows, vocab] count.
    rows = [i for i, p in enumerate(rows_params)
            if (p.presence_penalty or p.frequency_penalty) and len(rows_output_ids[i])]
    if not rows:
        return
    vocab_size, device = logits.shape[1], logits.device
    keys = torch.tensor([i * vocab_size + t for i in rows for t in rows_output_ids[i] if 0 <= t < vocab_size],
                        device=device, dtype=torch.int64)
    keys, counts = torch.unique(keys, return_counts=True)
    row_of_key = keys // vocab_size
    presence = torch.tensor([p.presence_penalty for p in rows_params], device=device, dtype=logits.dtype)
    frequency = torch.tensor([p.frequency_penalty for p in rows_params], device=device, dtype=logits.dtype)
    penalty = presence[row_of_key] + frequency[row_of_key] * counts.to(logits.dtype)
    logits.view(-1).index_add_(0, keys, -penalty)


def _apply_logit_bias(logits, rows_params) -> None:
    vocab_size = logits.shape[1]
    row_index, token_ids, biases = [], [], []
    for i, p in enumerate(rows_params):
        for token_id, bias in p.logit_bias.items():
            token_id = _as_token_id(token_id, vocab_size)
            if token_id is not None:  # the server rejects bad ids; the engine must not crash on them
                row_index.append(i)
                token_ids.append(token_id)
                biases.append(float(bias))
    if row_index:
        device = logits.device
        index = (torch.tensor(row_index, device=device), torch.tensor(token_ids, device=device))
        logits.index_put_(index, torch.tensor(biases, device=device, dtype=logits.dtype), accumulate=True)


def _as_token_id(key, vocab_size: int) -> int | None:
    """logit_bias keys arrive as ints or, straight from JSON, as digit strings."""
    try:
        token_id = int(key)
    except (TypeError, ValueError):
        return None
    return token_id if 0 <= token_id < vocab_size else None


# ---------------------------------------------------------------- probabilities


def probs_from_logits(logits: torch.Tensor, rows_params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p; returns [num_rows, vocab_size] probabilities.

    A greedy row (temperature 0) gets the one-hot of its argmax: the distribution it samples from,
    which is what speculative verification compares drafts against.
    """
    device, dtype = logits.device, logits.dtype
    # A tiny positive temperature would overflow logits / T into inf and NaN probabilities.
    temps = [max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in rows_params]
    logits = logits / torch.tensor(temps, device=device, dtype=dtype)[:, None]
    top_k = [p.top_k if p.top_k > 0 else 0 for p in rows_params]
    top_p = [p.top_p for p in rows_params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        logits = _truncate(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    greedy = [i for i, p in enumerate(rows_params) if p.greedy]
    if greedy:
        rows = torch.tensor(greedy, device=device)
        one_hot = torch.zeros(len(greedy), logits.shape[1], device=device, dtype=dtype)
        one_hot.scatter_(1, logits[rows].argmax(dim=-1, keepdim=True), 1.0)
        probs[rows] = one_hot
    return probs


def _truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the nucleus.

    The nucleus is the smallest most-likely-first prefix whose probability (after top-k) reaches
    top_p; the top token is always kept. A full vocabulary sort costs ~130 ms for 64 x 49152 on
    two CPU cores, so each row's sorted prefix is grown (topk 256, x8, ...) only until the row's cut
    point falls inside it; with top-k alone one topk(max k) suffices.
    """
    num_rows, vocab_size = logits.shape
    device = logits.device
    ks = torch.tensor([min(k, vocab_size) if k > 0 else vocab_size for k in top_k], device=device)
    ps = torch.tensor(top_p, device=device, dtype=logits.dtype)
    uses_p = ps < 1.0
    # Softmax denominators: over the row's top-k when it has one, else over the whole row.
    full_lse = torch.logsumexp(logits, dim=-1) if bool(uses_p.any()) else None
    keep_mask = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(num_rows, device=device)
    prefix = max(max(top_k), 256 if full_lse is not None else 1)
    while rows.numel():
        prefix = min(prefix, vocab_size)
        values, idx = logits[rows].topk(prefix, dim=-1)  # [len(rows), prefix], most likely first
        lse = full_lse[rows] if full_lse is not None else None
        keep, decided = _prefix_keep(values, ks[rows], ps[rows], uses_p[rows], lse)
        if prefix == vocab_size:
            decided[:] = True
        # Rows with neither a nucleus nor a top-k inside the prefix keep everything past it.
        tail = (ks[rows] > prefix) & ~uses_p[rows]
        row_keep = tail[:, None].expand(-1, vocab_size).clone().scatter_(1, idx, keep)
        keep_mask[rows[decided]] = row_keep[decided]
        rows = rows[~decided]
        prefix *= 8
    return logits.masked_fill(~keep_mask, float("-inf"))


def _prefix_keep(values, ks, ps, uses_p, full_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the sorted prefix tokens survive, and whether the prefix decided every row."""
    num_rows, prefix = values.shape
    positions = torch.arange(prefix, device=values.device)[None, :]
    keep = positions < ks[:, None]
    if full_lse is None:  # top-k only: the prefix holds every row's k tokens
        return keep, torch.ones(num_rows, dtype=torch.bool, device=values.device)
    in_k = ks[:, None] > positions
    k_lse = torch.logsumexp(values.masked_fill(~in_k, float("-inf")), dim=-1)
    lse = torch.where(ks <= prefix, k_lse, full_lse)
    probs = torch.exp(values - lse[:, None]).masked_fill(~in_k, 0.0)
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= ~(uses_p[:, None] & (mass_before >= ps[:, None]))
    keep[:, 0] = True
    # A row is decided when its top-k or its nucleus ends inside the prefix.
    decided = (ks <= prefix) | ~uses_p | (mass_before[:, -1] + probs[:, -1] >= ps)
    return keep, decided


# ---------------------------------------------------------------- sampling


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with one uniform from generators[i]; [num_rows] int64.

    probs may be unnormalized (verification samples from max(p - q, 0)). One uniform per row keeps
    per-request randomness cheap (an Exp(1) noise vector per row costs ~1 ms per row on CPU).
    Rows may share a generator (several rows of one request in verification): they draw in order.
    The CDF is two-level (a scan over block sums, then a float64 cumsum inside the chosen block):
    one pass over probs instead of a float64 copy and a full-vocabulary scan.
    """
    num_rows, vocab_size = probs.shape
    uniforms = torch.tensor([torch.rand(1, generator=g, dtype=torch.float64).item() for g in generators],
                            dtype=torch.float64, device=probs.device)
    pad = (-vocab_size) % _CDF_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.view(num_rows, -1, _CDF_BLOCK)  # [num_rows, num_blocks, BLOCK]
    # fp32 block sums (pairwise, ~1e-7 relative) are exact enough; the scan over blocks is float64.
    block_cdf = blocks.sum(dim=-1).to(torch.float64).cumsum(dim=-1)  # [num_rows, num_blocks]
    block_ids, offsets = _search(block_cdf, uniforms * block_cdf[:, -1])
    rows = torch.arange(num_rows, device=probs.device)
    inner_cdf = blocks[rows, block_ids].to(torch.float64).cumsum(dim=-1)  # [num_rows, BLOCK]
    token_in_block, _ = _search(inner_cdf, offsets)
    return block_ids * _CDF_BLOCK + token_in_block


def _search(cdf: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose CDF exceeds the target, and the target's offset past the index before.

    right=True skips flat CDF steps, so a zero-probability entry is never chosen; the target is
    kept just below the total so that rounding cannot run past the last positive entry.
    """
    targets = torch.minimum(targets, cdf[:, -1] * (1.0 - 1e-12))
    ids = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    before = cdf.gather(1, (ids - 1).clamp(min=0)[:, None]).squeeze(1)
    offsets = targets - torch.where(ids > 0, before, torch.zeros_like(before))
    return ids, offsets.clamp_(min=0.0)


# ---------------------------------------------------------------- logprobs


def compute_logprobs(
    logits: torch.Tensor,  # [num_rows, vocab_size], raw (before any processing)
    rows_params: Sequence[SamplingParams],
    token_ids: Sequence[int],
) -> list[TokenLogprob | None]:
    """The chosen token's raw logprob plus the top-N alternatives, for rows whose params ask for logprobs."""
    out: list[TokenLogprob | None] = [None] * len(rows_params)
    rows = [i for i, p in enumerate(rows_params) if p.logprobs is not None]
    if not rows:
        return out
    device = logits.device
    logprobs = torch.log_softmax(logits[torch.tensor(rows, device=device)].float(), dim=-1)
    chosen = torch.tensor([token_ids[i] for i in rows], device=device)
    chosen_values = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    num_top = max(0, min(max(rows_params[i].logprobs for i in rows), MAX_LOGPROBS))
    top_ids, top_values = [[]] * len(rows), [[]] * len(rows)
    if num_top > 0:
        values, ids = logprobs.topk(num_top, dim=-1)  # sorted, most likely first
        top_ids, top_values = ids.tolist(), values.tolist()
    for k, i in enumerate(rows):
        n = max(0, min(rows_params[i].logprobs, MAX_LOGPROBS))
        top = list(zip(top_ids[k][:n], top_values[k][:n]))
        out[i] = TokenLogprob(token_id=token_ids[i], logprob=chosen_values[k], top=top)
    return out
