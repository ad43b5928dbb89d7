"""`specd train bpd`: Blockwise Parallel Decoding heads (Stern, Shazeer, Uszkoreit 2018, "Blockwise
Parallel Decoding for Deep Autoregressive Models"); the drafter that uses them is engine/spec/bpd.py.

K heads read the frozen model's final-normed hidden state h_j at position j (the row whose logits
give token j + 1). Head i (1..K) guesses token j + 1 + i: g_i = h + SiLU(W_i h + b_i), a residual
block (as Medusa's heads), turned into logits by the model's own frozen lm_head. A zero-initialised
head is the identity, i.e. it starts as the model's next-token guess. Only W and b train.

Labels are the model's own greedy tokens (self-distillation with teacher forcing): the target of
head i at j is the argmax of the model's logits at j + i, its greedy choice for token j + 1 + i
given the record's tokens through j + i. For the greedy records' outputs that is the text itself.
Every position trains, prompt and output: the 192 committed records hold 27k prompt tokens beside
their 21k output tokens, and with them held-out head-1 accuracy rose from 0.22 to 0.24 in the
session-21 experiment (the heads overfit the outputs alone within a few epochs).
Held-out evaluation counts output positions only, the ones a served request drafts from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.spec.bpd import head_outputs
from engine.train.config import TrainConfig
from engine.train.data import Record
from engine.train.frozen import FrozenLlama
from engine.train.job import IGNORE, DraftAccuracy


@dataclass
class Features:
    """One record, ready to train on: hidden states and every head's label per position."""

    hidden: torch.Tensor  # [T, hidden] final-normed, fp32
    labels: torch.Tensor  # [T, K] head i+1's target at each position (IGNORE past the end)
    first_output: int  # the first position whose next token is an output token (len(prompt) - 1)


def init_heads(num_heads: int, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero heads (each the identity: the model's own next-token guess)."""
    return torch.zeros(num_heads, hidden_size, hidden_size), torch.zeros(num_heads, hidden_size)


@torch.no_grad()
def record_features(frozen: FrozenLlama, record: Record, num_heads: int) -> Features:
    hidden = frozen.prefix(record.token_ids).hidden
    greedy = frozen.logits(hidden).argmax(dim=-1)  # greedy[t]: the model's choice for token t + 1
    padded = torch.cat([greedy, torch.full((num_heads,), IGNORE, dtype=greedy.dtype)])
    index = torch.arange(hidden.shape[0])[:, None] + torch.arange(1, num_heads + 1)[None, :]
    return Features(hidden, padded[index], len(record.prompt_ids) - 1)


@dataclass
class BpdObjective:
    frozen: FrozenLlama
    top_k: int = 5

    def loss(self, params: list[torch.Tensor], example: Features, generator: torch.Generator) -> torch.Tensor:
        logits = self.frozen.logits(head_outputs(example.hidden, *params))  # [T, K, vocab]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), example.labels.reshape(-1), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, params: list[torch.Tensor], examples: list[Features]) -> dict:
        """DraftAccuracy by head over the held-out records' output positions."""
        accuracy = DraftAccuracy(params[0].shape[0], self.top_k)
        for example in examples:
            hidden, labels = example.hidden[example.first_output:], example.labels[example.first_output:]
            accuracy.add(self.frozen.logits(head_outputs(hidden, *params)), labels)
        return accuracy.summary("num_positions")


def train_bpd(model: str, data_path: str | Path, out: str | Path, num_heads: int = 2, epochs: int = 5,
              config: TrainConfig = TrainConfig(lr=3e-3), eval_fraction: float = 0.1,
              checkpoint: str | Path | None = None, command: str = "", progress: bool = True) -> dict:
    """Train the heads on a data file (`config.steps` is ignored: `epochs` passes over the training
    records, one record per step) and write the artifact; returns its header."""
    from tqdm import tqdm

    from engine.train.job import load_training_data, save_trained
    from engine.train.trainer import train

    if num_heads < 1 or epochs < 1:
        raise ValueError("num_heads >= 1 and epochs >= 1 are required")
    data = load_training_data(model, data_path, eval_fraction)
    frozen = FrozenLlama(data.model_dir)
    featurize = lambda rs: [record_features(frozen, r, num_heads)  # noqa: E731
                            for r in tqdm(rs, desc="hidden states", unit="record", disable=not progress)]
    train_set, eval_set = featurize(data.train), featurize(data.held_out)
    config = TrainConfig(**{**asdict(config), "steps": epochs * len(train_set)})
    weight, bias = init_heads(num_heads, frozen.hidden_size)
    result = train([weight, bias], BpdObjective(frozen), train_set, eval_set, config, checkpoint, progress)
    settings = {**asdict(config), "epochs": epochs, "eval_fraction": eval_fraction}
    return save_trained(out, {"weight": weight, "bias": bias}, "bpd", model, data, result, settings, command,
                        num_heads=num_heads)
