"""`specd train recycle`: RecycleGPT's recyclable module (Jiang et al. 2023) on the frozen model; the
drafter that uses it is engine/spec/recycle.py.

At position j the module reads h_j, the final-normed hidden state whose logits give token j + 1, and
the embedding of token j + 1, and guesses token j + 2; its output and token j + 2 give its guess for
token j + 3, and so on for `depth` rounds (trained unrolled, exactly as served). Labels are the model's
own greedy tokens (self-distillation with teacher forcing): round d's target at j is the model's
argmax at j + d. Every position trains, prompt and output; held-out evaluation counts output
positions, the ones a served request drafts from.

The draft vocabulary: the tokens the model chose most often over the training records, then the
tokenizer's earliest ids (BPE ids run roughly from frequent to rare) up to `vocab_size`. Training and
serving score only it, which makes a round ~6x cheaper than one over the full vocabulary; a target
outside it cannot be drafted and does not count in the loss (evaluation counts it as a miss).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.spec.recycle import RecycleModule, recycle
from engine.train.config import TrainConfig
from engine.train.data import Record
from engine.train.frozen import FrozenLlama
from engine.train.job import IGNORE, DraftAccuracy


@dataclass
class Features:
    """One record, ready to train on."""

    hidden: torch.Tensor  # [T, H] final-normed, fp32
    inputs: torch.Tensor  # [T, depth] round d's input token at j: token j + 1 + d (0 past the end)
    labels: torch.Tensor  # [T, depth] round d's target at j: its index in the draft vocabulary, V' if it is
    # outside, IGNORE past the end
    first_output: int  # the first position whose next token is an output token (len(prompt) - 1)


def init_module(hidden_size: int, ffn_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """w_in = [I, 0] and w_2 = 0: the untrained module returns h itself, i.e. guesses the token just emitted's
    own next-token guess again. w_1 is small and random so gradients reach w_2 from the first step."""
    w_in = torch.cat([torch.eye(hidden_size), torch.zeros(hidden_size, hidden_size)], dim=1)
    w_1 = torch.randn(ffn_size, hidden_size, generator=generator) * hidden_size**-0.5
    return [w_in, torch.zeros(hidden_size), w_1, torch.zeros(ffn_size), torch.zeros(hidden_size, ffn_size)]


@torch.no_grad()
def greedy_tokens(frozen: FrozenLlama, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden # [T, H], greedy # [T]): greedy[t] is the model's choice for token t + 1."""
    hidden = frozen.prefix(record.token_ids).hidden
    return hidden, frozen.logits(hidden).argmax(dim=-1)


def draft_vocabulary(greedy: list[torch.Tensor], vocab_size: int, model_vocab: int) -> torch.Tensor:
    """The model's most frequent choices (ties: lower id first), then the lowest remaining ids."""
    counts = torch.bincount(torch.cat(greedy), minlength=model_vocab).double()
    counts -= torch.arange(model_vocab, dtype=torch.double) / model_vocab  # ties and unseen ids: lower id first
    return counts.argsort(descending=True)[:min(vocab_size, model_vocab)]


def record_features(record: Record, hidden: torch.Tensor, greedy: torch.Tensor, index_of: torch.Tensor,
                    depth: int) -> Features:
    """index_of # [model vocab]: a token's index in the draft vocabulary (V' outside it)."""
    num = hidden.shape[0]
    tokens = torch.tensor(record.token_ids)
    j = torch.arange(num)[:, None] + torch.arange(depth)[None, :]  # [T, depth]: round d reads token j + 1 + d
    inside = j + 1 < num
    inputs = torch.where(inside, tokens[(j + 1).clamp(max=num - 1)], 0)
    labels = torch.where(inside, index_of[greedy[(j + 1).clamp(max=num - 1)]], IGNORE)
    return Features(hidden, inputs, labels, len(record.prompt_ids) - 1)


@dataclass
class RecycleObjective:
    frozen: FrozenLlama
    head: torch.Tensor  # [V', H] the lm_head rows of the draft vocabulary
    top_k: int = 5

    def logits(self, params: list[torch.Tensor], hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """# [T, depth, V']: the module unrolled from every position."""
        rounds = []
        for d in range(inputs.shape[1]):
            hidden = recycle(hidden, F.embedding(inputs[:, d], self.frozen.embed), *params)
            rounds.append(F.linear(hidden, self.head))
        return torch.stack(rounds, dim=1)

    def loss(self, params: list[torch.Tensor], example: Features, generator: torch.Generator) -> torch.Tensor:
        logits = self.logits(params, example.hidden, example.inputs)
        labels = example.labels.masked_fill(example.labels == len(self.head), IGNORE)  # undraftable: no gradient
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, params: list[torch.Tensor], examples: list[Features]) -> dict:
        """DraftAccuracy by round over the held-out records' output positions; a target outside the
        draft vocabulary counts as a miss."""
        accuracy = DraftAccuracy(examples[0].inputs.shape[1], self.top_k)
        for example in examples:
            start = example.first_output
            logits = self.logits(params, example.hidden[start:], example.inputs[start:])
            outside = logits.amin(dim=-1, keepdim=True) - 1  # V': never right, scored as the worst token
            accuracy.add(torch.cat([logits, outside], dim=-1), example.labels[start:])
        return accuracy.summary("num_positions")


def build_examples(frozen: FrozenLlama, train_records: list[Record], eval_records: list[Record], vocab_size: int,
                   depth: int, progress: bool = False) -> tuple[list[Features], list[Features], torch.Tensor]:
    """(training examples, held-out examples, the draft vocabulary chosen from the training records)."""
    from tqdm import tqdm

    records = train_records + eval_records
    states = {r.record_id: greedy_tokens(frozen, r)
              for r in tqdm(records, desc="hidden states", unit="record", disable=not progress)}
    model_vocab = frozen.embed.shape[0]
    vocab = draft_vocabulary([states[r.record_id][1] for r in train_records], vocab_size, model_vocab)
    index_of = torch.full((model_vocab,), len(vocab), dtype=torch.long)
    index_of[vocab] = torch.arange(len(vocab))
    featurize = lambda rs: [record_features(r, *states[r.record_id], index_of, depth) for r in rs]  # noqa: E731
    return featurize(train_records), featurize(eval_records), vocab


def train_recycle(model: str, data_path: str | Path, out: str | Path, depth: int = 2, vocab_size: int = 16384,
                  ffn_size: int = 1536, epochs: int = 10, config: TrainConfig = TrainConfig(lr=1e-3),
                  eval_fraction: float = 0.1, checkpoint: str | Path | None = None, command: str = "",
                  progress: bool = True) -> dict:
    """Train the module on a data file (`config.steps` is ignored: `epochs` passes over the training
    records, one record per step) and write the artifact; returns its header."""
    from engine.train.job import load_training_data, save_trained
    from engine.train.trainer import train

    if depth < 1 or epochs < 1 or vocab_size < 1 or ffn_size < 1:
        raise ValueError("depth, epochs, vocab_size and ffn_size must be >= 1")
    data = load_training_data(model, data_path, eval_fraction)
    frozen = FrozenLlama(data.model_dir)
    train_set, eval_set, vocab = build_examples(frozen, data.train, data.held_out, vocab_size, depth, progress)
    config = TrainConfig(**{**asdict(config), "steps": epochs * len(train_set)})
    params = init_module(frozen.hidden_size, ffn_size, torch.Generator().manual_seed(config.seed))
    objective = RecycleObjective(frozen, frozen.model.lm_head[vocab])  # (the frozen model's lm_head is dense)
    result = train(params, objective, train_set, eval_set, config, checkpoint, progress)
    settings = {**asdict(config), "epochs": epochs, "eval_fraction": eval_fraction}
    tensors = dict(zip(RecycleModule.TENSORS, params)) | {"vocab": vocab}
    return save_trained(out, tensors, "recycle", model, data, result, settings, command, depth=depth,
                        vocab_size=len(vocab), ffn_size=ffn_size)
