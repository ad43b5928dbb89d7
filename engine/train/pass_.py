"""`specd train pass`: PaSS look-ahead embeddings (Monea, Joulin, Grave 2023, "PaSS: Parallel
Speculative Sampling"); the drafter that uses them is engine/spec/lookahead.py.

Only the L x d_model embeddings train. One example is one self-distilled sequence (prompt + the
model's own continuation, engine/train/data.py): its K/V are computed once without gradients, then
K random *split points* r (the root, the last real token, inside the continuation) each get the L
look-ahead rows a_1..a_L at positions r + 1 .. r + L, attending to tokens[: r + 1] and to the
earlier look-ahead rows of their own group, exactly as in serving. Row a_i is trained by
cross-entropy to predict tokens[r + 1 + i], the model's own token i + 1 places after the root's
next one. All K groups share one forward.

Untrained embeddings (the benchmark's baseline, and the starting point) are all L rows set to the
mean of the model's token embeddings.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.train.data import Record
from engine.train.frozen import FrozenLlama
from engine.train.config import TrainConfig

IGNORE = -100


def init_embeddings(frozen: FrozenLlama, num_lookahead: int) -> torch.Tensor:
    """[L, hidden]: every row the mean token embedding."""
    return mean_embedding_rows(frozen.embed, num_lookahead)


def mean_embedding_rows(embed: torch.Tensor, num_lookahead: int) -> torch.Tensor:
    """embed # [vocab, hidden] -> [L, hidden], every row the mean token embedding."""
    return embed.float().mean(dim=0, keepdim=True).repeat(num_lookahead, 1).clone()


def write_untrained_artifact(model: str, out: str | Path, num_lookahead: int | None = None,
                             like: str | Path | None = None) -> Path:
    """The untrained baseline as an artifact (L from `like`'s header when not given)."""
    from safetensors import safe_open

    from engine.models.loader import model_name, resolve_model_dir
    from engine.train.artifact import read_header, save_artifact, weight_fingerprint

    model_dir = resolve_model_dir(model)
    if num_lookahead is None:
        num_lookahead = read_header(like)["num_lookahead"] if like is not None else 4
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                embed = f.get_tensor("model.embed_tokens.weight")
    return save_artifact(out, {"lookahead": mean_embedding_rows(embed, num_lookahead)}, method="pass",
                         base_model=model_name(model), base_model_hash=weight_fingerprint(model_dir),
                         num_lookahead=num_lookahead, untrained=True)


def group_mask(roots: torch.Tensor, num_tokens: int, num_lookahead: int) -> torch.Tensor:
    """[K * L, T + K * L] bool: group k's rows see tokens 0..roots[k] and their own earlier rows."""
    k = roots.numel()
    prefix = torch.arange(num_tokens)[None, :] <= roots[:, None]  # [K, T]
    prefix = prefix.repeat_interleave(num_lookahead, dim=0)  # [K * L, T]
    own = torch.block_diag(*[torch.ones(num_lookahead, num_lookahead)] * k).bool()
    causal = torch.tril(torch.ones(k * num_lookahead, k * num_lookahead)).bool()
    return torch.cat([prefix, own & causal], dim=1)


def lookahead_logits(frozen: FrozenLlama, prefix, embeds: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
    """# [K, L, vocab]: the look-ahead rows' logits for every root (differentiable in embeds)."""
    num_lookahead = embeds.shape[0]
    positions = (roots[:, None] + 1 + torch.arange(num_lookahead)[None, :]).reshape(-1)
    mask = group_mask(roots, prefix.num_tokens, num_lookahead).to(frozen.device)
    rows = embeds.repeat(roots.numel(), 1)
    hidden = frozen.extend(prefix, rows, positions.to(frozen.device), mask)
    return frozen.logits(hidden).view(roots.numel(), num_lookahead, -1)


def targets(token_ids: list[int], roots: torch.Tensor, num_lookahead: int) -> torch.Tensor:
    """# [K, L] tokens[root + 2 + i] (IGNORE past the end)."""
    tokens = torch.tensor(token_ids + [IGNORE] * (num_lookahead + 2))
    index = roots[:, None] + 2 + torch.arange(num_lookahead)[None, :]
    return tokens[index]


def candidate_roots(record: Record) -> torch.Tensor:
    """Split points whose first look-ahead target is an output token: the last prompt token onward."""
    first = len(record.prompt_ids) - 1
    return torch.arange(first, len(record.token_ids) - 2)


@dataclass
class PassObjective:
    frozen: FrozenLlama
    roots_per_example: int = 48
    eval_roots: int = 32
    top_k: int = 5

    def loss(self, params: list[torch.Tensor], example: Record, generator: torch.Generator) -> torch.Tensor:
        embeds = params[0]
        roots = candidate_roots(example)
        if roots.numel() > self.roots_per_example:
            roots = roots[torch.randperm(roots.numel(), generator=generator)[:self.roots_per_example]].sort().values
        prefix = self.frozen.prefix(example.token_ids)
        logits = lookahead_logits(self.frozen, prefix, embeds, roots)
        tgt = targets(example.token_ids, roots, embeds.shape[0]).to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, params: list[torch.Tensor], examples: list[Record]) -> dict:
        """Per look-ahead position: top-1 and top-k accuracy, and `chain` = the share of roots whose
        first i + 1 drafts are all top-1 correct (greedy acceptance of i + 1 drafts); plus the mean
        loss and `accepted_per_step` = the expected greedy drafts accepted per drafting step."""
        embeds = params[0].detach()
        num_lookahead = embeds.shape[0]
        generator = torch.Generator().manual_seed(1234)  # the same roots every evaluation
        hits1, hitsk, chain, valid, losses = [torch.zeros(num_lookahead) for _ in range(5)]
        for example in examples:
            roots = candidate_roots(example)
            if roots.numel() == 0:
                continue
            if roots.numel() > self.eval_roots:
                roots = roots[torch.randperm(roots.numel(), generator=generator)[:self.eval_roots]].sort().values
            logits = lookahead_logits(self.frozen, self.frozen.prefix(example.token_ids), embeds, roots).cpu()
            tgt = targets(example.token_ids, roots, num_lookahead)
            ok = tgt != IGNORE
            top = logits.topk(self.top_k, dim=-1).indices  # [K, L, k]
            correct1 = (top[..., 0] == tgt) & ok
            hits1 += correct1.sum(0)
            hitsk += ((top == tgt[..., None]).any(-1) & ok).sum(0)
            chain += correct1.cumprod(dim=1).sum(0)
            valid += ok.sum(0)
            ce = F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
            losses += (ce * ok).sum(0)
        n = valid.clamp(min=1)
        return {"loss": float(losses.sum() / n.sum()), "top1": _round(hits1 / n), f"top{self.top_k}": _round(hitsk / n),
                "chain": _round(chain / n), "accepted_per_step": round(float((chain / n).sum()), 4),
                "num_roots": int(valid[0])}


def _round(t: torch.Tensor) -> list[float]:
    return [round(float(x), 4) for x in t]


def split_records(records: list[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, held out): every round(1 / eval_fraction)-th record by id is held out."""
    ordered = sorted(records, key=lambda r: r.record_id)
    if eval_fraction <= 0:
        return ordered, []
    every = max(2, round(1 / eval_fraction))
    return ([r for i, r in enumerate(ordered) if i % every], [r for i, r in enumerate(ordered) if not i % every])


def train_pass(model: str, data_path: str | Path, out: str | Path, num_lookahead: int = 4,
               config: TrainConfig = TrainConfig(), roots_per_example: int = 48, eval_fraction: float = 0.1,
               checkpoint: str | Path | None = None, command: str = "", progress: bool = True) -> dict:
    """Train the embeddings on a data file and write the artifact; returns its header."""
    from engine.models.loader import model_name, resolve_model_dir
    from engine.train.artifact import read_header, save_artifact, weight_fingerprint
    from engine.train.data import read_records
    from engine.train.trainer import train

    if num_lookahead < 1:
        raise ValueError("num_lookahead must be >= 1")
    model_dir = resolve_model_dir(model)
    fingerprint = weight_fingerprint(model_dir)
    meta, records = read_records(data_path)
    if meta.get("base_model_hash") != fingerprint:
        raise ValueError(f"{data_path} was generated by another model ({meta.get('base_model_hash')}); "
                         f"the served model's weights are {fingerprint}")
    train_records, eval_records = split_records(records, eval_fraction)
    frozen = FrozenLlama(model_dir)
    embeds = init_embeddings(frozen, num_lookahead)
    objective = PassObjective(frozen, roots_per_example)
    result = train([embeds], objective, train_records, eval_records, config, checkpoint, progress)
    data_bytes = Path(data_path).read_bytes()
    save_artifact(out, {"lookahead": embeds}, method="pass", base_model=model_name(model), base_model_hash=fingerprint,
                  num_lookahead=num_lookahead, command=command, train={**asdict(config), "roots_per_example":
                  roots_per_example, "eval_fraction": eval_fraction},
                  data={"file": Path(data_path).name, "sha256": hashlib.sha256(data_bytes).hexdigest(),
                        "records": len(records), "train_records": len(train_records),
                        "eval_records": len(eval_records), "command": meta.get("command", "")},
                  eval={"untrained": result.evals[0] if result.evals else None,
                        "trained": result.evals[-1] if result.evals else None},
                  history=result.evals, final_loss=result.losses[-1] if result.losses else None)
    return read_header(out)
