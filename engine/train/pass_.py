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

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.train.config import TrainConfig
from engine.train.data import Record
from engine.train.frozen import FrozenLlama
from engine.train.job import IGNORE, DraftAccuracy


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
        """DraftAccuracy by look-ahead position over up to eval_roots split points per record."""
        embeds = params[0].detach()
        num_lookahead = embeds.shape[0]
        generator = torch.Generator().manual_seed(1234)  # the same roots every evaluation
        accuracy = DraftAccuracy(num_lookahead, self.top_k)
        for example in examples:
            roots = candidate_roots(example)
            if roots.numel() == 0:
                continue
            if roots.numel() > self.eval_roots:
                roots = roots[torch.randperm(roots.numel(), generator=generator)[:self.eval_roots]].sort().values
            logits = lookahead_logits(self.frozen, self.frozen.prefix(example.token_ids), embeds, roots).cpu()
            accuracy.add(logits, targets(example.token_ids, roots, num_lookahead))
        return accuracy.summary("num_roots")


def train_pass(model: str, data_path: str | Path, out: str | Path, num_lookahead: int = 4,
               config: TrainConfig = TrainConfig(), roots_per_example: int = 48, eval_fraction: float = 0.1,
               checkpoint: str | Path | None = None, command: str = "", progress: bool = True) -> dict:
    """Train the embeddings on a data file and write the artifact; returns its header."""
    from engine.train.job import load_training_data, save_trained
    from engine.train.trainer import train

    if num_lookahead < 1:
        raise ValueError("num_lookahead must be >= 1")
    data = load_training_data(model, data_path, eval_fraction)
    frozen = FrozenLlama(data.model_dir)
    embeds = init_embeddings(frozen, num_lookahead)
    objective = PassObjective(frozen, roots_per_example)
    result = train([embeds], objective, data.train, data.held_out, config, checkpoint, progress)
    settings = {**asdict(config), "roots_per_example": roots_per_example, "eval_fraction": eval_fraction}
    return save_trained(out, {"lookahead": embeds}, "pass", model, data, result, settings, command,
                        num_lookahead=num_lookahead)
