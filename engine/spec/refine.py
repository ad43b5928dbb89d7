"""Draft refinement: a lattice of blind guesses rescored by an n-gram language model.

Kim et al. 2024, "Exploring and Improving Drafts in Blockwise Parallel Decoding": BPD heads guess
each future position independently, so their argmax chain often repeats or skips a word (head 1
guesses the token after the one the model is emitting now without knowing which token that is).
The paper builds a lattice from each head's top-k tokens and rescores its paths with a small LM,
an n-gram LM (global rescoring, the p best paths) or a neural LM (local); the verifier then checks
the rescored drafts as before, so the output is unchanged (lossless) and only acceptance moves.
PaSS's look-ahead rows (engine/spec/lookahead.py) are blind the same way: the row a_1 guesses the
token after the one the same forward emits. So one `Refiner` serves both drafters.

Here the LM is a Witten-Bell interpolated n-gram model of the request's own text (prompt and output,
counted incrementally, like prompt lookup's index) whose lowest order backs off to a global n-gram
model of the served model's self-distilled data (engine/train/data.py's records, when given) instead
of the uniform distribution. A path's score is its heads' log-probabilities plus `weight` x the
LM's log-probability of each token given the text before it (the emitted token included, which the
heads never saw). Measured on the default model, 2 heads, top-4 per head (session 23,
benchmarks/results/bpd_refine_cpu.txt): teacher-forced, the 2-draft chain's accepted drafts per step
rose from 0.141 to 0.225 on Spec-Bench outputs and from 0.317 to 0.477 on held-out self-distilled
records (the request's own text alone: 0.212 and 0.420; weight 0.5 / 2 gave less / the same); the
p = 2 best paths as a tree gave 0.264 for 3.5 nodes instead of 2, so one path is the default. Served
at batch 1 (fp32, engine only) the draft controller then kept more drafts: 1.08x `none` against the
unrefined heads' 1.02x, outputs identical. In int8, where a verify row costs more of a shorter step,
neither paid (0.97x / 0.98x). PaSS's single look-ahead row (session 24, benchmarks/refine.py,
results/refine_cpu.txt): 0.224 -> 0.327 accepted drafts per step on Spec-Bench outputs, 0.234 ->
0.388 held out; at batch 1, fp32, 1.16x `none` over HTTP (unrefined: 1.06x in session 18).

The lattice is wider than the paper's: each row offers its own top-k tokens and the LM's
`lm_candidates` likeliest next tokens after the path so far, each scored by the row's logit for it
plus the LM's. Why: a row blind to the token before it often ranks the right token below its top 4,
and the LM, which knows that token, is right more often than the row (session 25, teacher-forced,
Spec-Bench outputs, weight 3): PaSS L 1 0.327 -> 0.529 accepted drafts per step, L 2 0.378 -> 0.884,
BPD's 2 heads 0.225 -> 0.743. What the rows add to the LM: its own greedy chain alone accepts 0.460
(1 draft) and 0.783 (2 drafts), so the look-ahead rows add 0.07-0.10 per step, and BPD's heads,
whose logits are sharper, take 0.04 away; `--refine-lm-candidates 0` serves the paper's lattice.
Served at batch 1 (fp32, engine only, 18 prompts x 2 rounds): PaSS L 1 1.25x `none` (rows' top 4
alone: 1.18x), L 2 1.30x, BPD 1.32x (1.08x before), outputs identical.

Greedy requests draft the best path. Sampled requests draw each draft from the head's own sampling
distribution (temperature, top-k, top-p) reweighted by LM^weight over its top-k tokens and the LM's
candidates that the request may sample, one position after another (the next position's LM is
conditioned on the drawn token); that reweighted row is the draft's q, so the verifier's
min(1, p/q) test keeps the output distribution exact.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.sampler import get_generator, probs_from_logits
from engine.spec.base import PendingDrafts
from engine.types import Request

ORDER = 3
"""n-gram order: contexts of up to ORDER - 1 tokens (prompt lookup's index matches up to 3)."""
LM_STATE_KEY = "draft_lm"
"""request.state key of the request's own NgramLM (a request drafts with one method at a time)."""


class NgramLM:
    """Witten-Bell interpolated n-gram LM over token ids (Witten & Bell 1991; Chen & Goodman 1998):
    p(w | h) = (c(h, w) + T(h) p(w | h')) / (c(h) + T(h)), h' = h without its oldest token, T(h) the
    number of distinct tokens seen after h; the order-0 context backs off to `base` (another NgramLM)
    or to the uniform distribution over `vocab_size` tokens. `add` counts text incrementally."""

    def __init__(self, vocab_size: int, order: int = ORDER, base: "NgramLM | None" = None):
        if order < 1 or vocab_size < 1:
            raise ValueError("order >= 1 and vocab_size >= 1 are required")
        self.vocab_size, self.order, self.base = vocab_size, order, base
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        self.totals: dict[tuple[int, ...], int] = {}
        self.num_tokens = 0  # of the text `extend` has counted

    def add(self, token_ids: list[int]) -> None:
        """Count one separate text (a training record)."""
        for i in range(len(token_ids)):
            self._count(token_ids, i)

    def extend(self, token_ids: list[int]) -> None:
        """Count what a growing text gained since the last call (a request's prompt + output)."""
        for i in range(self.num_tokens, len(token_ids)):
            self._count(token_ids, i)
        self.num_tokens = max(self.num_tokens, len(token_ids))

    def _count(self, token_ids: list[int], i: int) -> None:
        token = token_ids[i]
        for n in range(min(self.order - 1, i) + 1):
            context = tuple(token_ids[i - n:i])
            following = self.counts.setdefault(context, {})
            following[token] = following.get(token, 0) + 1
            self.totals[context] = self.totals.get(context, 0) + 1

    def candidates(self, context: list[int], num: int) -> list[tuple[int, float]]:
        """Up to `num` likely next tokens with their probabilities, likeliest first: the most frequent
        after the longest history (at least one token) that this LM, and its base, has seen end like
        `context`."""
        found: set[int] = set()
        for lm in (self, self.base):
            for n in range(min(self.order - 1, len(context)), 0, -1) if lm is not None else ():
                following = lm.counts.get(tuple(context[len(context) - n:]))
                if following:
                    found.update(heapq.nlargest(num, following, key=following.get))
                    break
        return heapq.nlargest(num, ((token, self.prob(context, token)) for token in found), key=lambda tp: tp[1])

    def prob(self, context: list[int], token: int) -> float:
        """p(token | the last order - 1 tokens of context)."""
        p = self.base.prob(context, token) if self.base is not None else 1.0 / self.vocab_size
        for n in range(min(self.order - 1, len(context)) + 1):
            history = tuple(context[len(context) - n:])
            following = self.counts.get(history)
            if following is None:  # no longer history ending like this one was seen either
                break
            types = len(following)
            p = (following.get(token, 0) + types * p) / (self.totals[history] + types)
        return p


@dataclass(frozen=True)
class RefineConfig:
    """How the lattice is built and rescored."""

    top_k: int = 4
    """Tokens per head in the lattice."""
    weight: float = 1.0
    """The LM's log-probability weight against the heads' (0: the heads' argmax, unrefined)."""
    num_paths: int = 1
    """Best paths kept as a tree (the paper's p-best); 1: a chain."""
    lm_candidates: int = 0
    """The LM's own likeliest next tokens added to each head's top_k (0: the paper's lattice)."""

    def __post_init__(self):
        if self.top_k < 1 or self.num_paths < 1 or self.weight < 0 or self.lm_candidates < 0:
            raise ValueError("top_k >= 1, num_paths >= 1, weight >= 0 and lm_candidates >= 0 are required")


def best_paths(logits: torch.Tensor, lm: NgramLM, context: list[int], weight: float, num_paths: int,
               top_k: int, lm_candidates: int = 0) -> list[list[int]]:
    """The num_paths best paths through the lattice, best first. logits # [K, vocab]: each head's row
    (raw logits or log-probabilities: a path takes one token per head, so each head's normaliser
    adds the same to every path and the ranking is the same without the log-softmax). Row i offers
    its top_k tokens plus the LM's lm_candidates likeliest tokens after the path so far. Every path
    is scored ((top_k + lm_candidates)^K at most: 64 for the default 2 heads), so the result is
    exact, not a beam's."""
    tops = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices.tolist()
    lm_logp: dict[tuple[int, ...], float] = {}  # memo: a prefix's last token given the text before it
    row_value: dict[tuple[int, int], float] = {}  # memo: (row, token) -> its logit (paths share them)

    def lm_score(prefix: tuple[int, ...]) -> float:
        score = lm_logp.get(prefix)
        if score is None:
            score = lm_logp[prefix] = math.log(lm.prob(context + list(prefix[:-1]), prefix[-1]))
        return score

    def value(i: int, token: int) -> float:
        v = row_value.get((i, token))
        if v is None:
            v = row_value[(i, token)] = float(logits[i, token])
        return v

    def paths(prefix: tuple[int, ...]):
        if len(prefix) == len(tops):
            yield prefix
            return
        tokens = dict.fromkeys(tops[len(prefix)])  # ordered, without repeats
        for token, p in lm.candidates(context + list(prefix), lm_candidates) if lm_candidates else ():
            tokens[token] = None
            lm_logp[prefix + (token,)] = math.log(p)  # ranked by it already: no second lookup
        for token in tokens:
            yield from paths(prefix + (token,))

    scored = []
    for path in paths(()):
        score = sum(value(i, token) for i, token in enumerate(path))
        if weight:
            score += weight * sum(lm_score(path[:i + 1]) for i in range(len(path)))
        scored.append((-score, path))
    scored.sort()
    return [list(path) for _, path in scored[:num_paths]]


def sample_path(probs: torch.Tensor, lm: NgramLM, context: list[int], weight: float, top_k: int,
                generator: torch.Generator | None, lm_candidates: int = 0) -> tuple[list[int], torch.Tensor]:
    """Draw one draft per head row from its sampling distribution reweighted by LM^weight over its
    top_k tokens and the LM's lm_candidates likeliest (those the request may sample: p > 0), each
    conditioned on the draws before it. probs # [K, vocab] (the request's own temperature / top-k /
    top-p applied). Returns (drafts, q # [K, vocab]: each draft's distribution)."""
    drafts: list[int] = []
    q = torch.zeros_like(probs)
    for i in range(probs.shape[0]):
        tokens = dict.fromkeys(probs[i].topk(min(top_k, probs.shape[1])).indices.tolist())
        if lm_candidates:
            tokens.update(dict.fromkeys(token for token, _ in lm.candidates(context + drafts, lm_candidates)))
        ids = torch.tensor(list(tokens), dtype=torch.long)
        p = probs[i, ids].double()
        ids, p = ids[p > 0], p[p > 0]
        lm_p = torch.tensor([lm.prob(context + drafts, int(t)) for t in ids.tolist()], dtype=torch.float64)
        w = p * lm_p ** weight
        q[i, ids] = (w / w.sum()).to(q.dtype)
        drafts.append(int(torch.multinomial(q[i], 1, generator=generator)))
    return drafts, q


def trie(paths: list[list[int]]) -> tuple[list[int], list[int]]:
    """(token_ids, parents) of the tree whose root-to-leaf paths are `paths`, equal prefixes merged,
    nodes in path order (the best path's nodes first, so the verifier tries it first)."""
    token_ids, parents, nodes = [], [], {}
    for path in paths:
        parent = -1
        for token in path:
            key = (parent, token)
            if key not in nodes:
                nodes[key] = len(token_ids)
                token_ids.append(token)
                parents.append(parent)
            parent = nodes[key]
    return token_ids, parents


def global_lm(vocab_size: int, texts: list[list[int]], order: int = ORDER) -> NgramLM:
    """The global LM of a set of texts (the self-distilled records' token ids)."""
    lm = NgramLM(vocab_size, order)
    for text in texts:
        lm.add(text)
    return lm


class Refiner:
    """Turns rows of blind guesses into refined pending drafts: the request's own n-gram LM (backed
    off to `global_lm`) rescores their top-k lattice, conditioned on the text and the tokens the step
    emitted."""

    def __init__(self, config: RefineConfig, global_lm: NgramLM | None = None):
        self.config = config
        self.global_lm = global_lm
        """The n-gram LM of the self-distilled data each request's own LM backs off to (None: uniform)."""

    def redraft(self, request: Request, state: PendingDrafts, logits: torch.Tensor, emitted: list[int],
                anchor: int, num_paths: int | None = None) -> None:
        """Set `state` to the drafts of logits # [n, vocab] (row i: the token i + 1 places after the
        last of `emitted`, this step's tokens, not yet in request.token_ids). num_paths: at most the
        config's (1 for a drafter that needs a chain)."""
        lm = request.state.get(LM_STATE_KEY)
        if lm is None:
            lm = request.state[LM_STATE_KEY] = NgramLM(logits.shape[-1], base=self.global_lm)
        lm.extend(request.token_ids)  # this step's tokens are counted next step, but condition now:
        context = request.token_ids[-(ORDER - 1):] + emitted
        state.q, state.parents, state.anchor = None, None, anchor
        weight, top_k = self.config.weight, self.config.top_k
        num_paths = self.config.num_paths if num_paths is None else min(num_paths, self.config.num_paths)
        if request.sampling.greedy:
            paths = best_paths(logits.float(), lm, context, weight, num_paths, top_k, self.config.lm_candidates)
            state.drafts, parents = trie(paths)
            state.parents = None if len(paths) == 1 else parents
        else:
            probs = probs_from_logits(logits.float(), [request.sampling] * logits.shape[0])
            state.drafts, state.q = sample_path(probs, lm, context, weight, top_k, get_generator(request),
                                                self.config.lm_candidates)


def load_refiner(config) -> Refiner | None:
    """The refiner of an EngineConfig (None when refine_weight is 0), with the global n-gram LM of
    config.refine_ngram_data, or of the committed self-distilled data for this model when there is
    some ("" or no such file: each request's own text alone). Raises ValueError for a named file that
    is missing or was made by another model."""
    if not config.refine_weight:
        return None
    refine = RefineConfig(weight=config.refine_weight, num_paths=config.refine_paths,
                          lm_candidates=config.refine_lm_candidates)
    return Refiner(refine, _data_lm(config))


def _data_lm(config) -> NgramLM | None:
    from engine.config import ModelConfig
    from engine.models.loader import model_name
    from engine.train.artifact import ARTIFACTS_DIR
    from engine.train.job import load_training_data

    path = config.refine_ngram_data
    if path is None:
        path = ARTIFACTS_DIR / "pass" / f"{model_name(config.model)}.data.jsonl"
        if not path.is_file():
            return None
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"--refine-ngram-data {path} does not exist (give self-distilled records from "
                         f"`specd train data`, or \"\" for each request's own text alone)")
    data = load_training_data(config.model, path, eval_fraction=0.0)  # refuses another model's data
    return global_lm(ModelConfig.from_hf_dir(data.model_dir).vocab_size, [r.token_ids for r in data.records])
