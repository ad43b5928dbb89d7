"""The training loop every drafter shares: a frozen base model, a few trainable tensors.

AdamW with linear warm-up and a cosine decay to `min_lr_ratio`, gradient-norm clipping, a held-out
evaluation every `eval_every` steps (and before the first step, so the untrained baseline is on
record), checkpoints every `checkpoint_every` steps that a later run resumes from, a progress bar.
Deterministic under `seed`: every random draw of the objective comes from one torch.Generator whose
state is checkpointed with the parameters and the optimizer.

The example order of epoch e is a permutation seeded by (seed, e).
A drafter plugs in an `Objective`: `loss(params, example, generator)` for one training example and
`evaluate(params, examples)` returning a metrics dict (it must be deterministic by itself).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from engine.train.config import TrainConfig

log = logging.getLogger(__name__)


class Objective(Protocol):
    def loss(self, params: list[torch.Tensor], example: Any, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss of one example (random choices drawn from `generator` only)."""
        ...

    def evaluate(self, params: list[torch.Tensor], examples: list) -> dict:
        """Held-out metrics (deterministic)."""
        ...


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step": s, **metrics}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr at `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(params: list[torch.Tensor], objective: Objective, train_examples: list, eval_examples: list,
          config: TrainConfig, checkpoint: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Optimise `params` (leaf tensors, updated in place); resumes from `checkpoint` if it exists."""
    from tqdm import tqdm

    if not train_examples:
        raise ValueError("no training examples")
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    result, start = TrainResult(), 0
    if checkpoint is not None and Path(checkpoint).exists():
        start = _load_checkpoint(Path(checkpoint), params, optimizer, generator, result, config)
        log.info("resumed from %s at step %d", checkpoint, start)
    if start == 0:
        result.evals.append({"step": 0, **objective.evaluate(params, eval_examples)})
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not progress)
    for step in range(start, config.steps):
        order = _epoch_order(len(train_examples), step // len(train_examples), config.seed)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss = objective.loss(params, train_examples[order[step % len(train_examples)]], generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        result.losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            result.evals.append({"step": done, **objective.evaluate(params, eval_examples)})
            log.info("step %d eval %s", done, result.evals[-1])
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(Path(checkpoint), done, params, optimizer, generator, result, config)
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return result


def _epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The example order of an epoch (from its own seed, so a resumed run needs no extra state)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _save_checkpoint(path: Path, step: int, params, optimizer, generator, result: TrainResult, config) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"step": step, "params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "losses": result.losses, "evals": result.evals,
                "config": asdict(config)}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, params, optimizer, generator, result: TrainResult, config) -> int:
    state = torch.load(path, weights_only=False)
    if state["config"] != asdict(config):
        raise ValueError(f"checkpoint {path} was made with other settings {state['config']}; remove it to start over")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    result.losses, result.evals = state["losses"], state["evals"]
    return state["step"]
