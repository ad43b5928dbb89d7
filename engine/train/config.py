"""Training configuration: frozen dataclasses, pure Python (the CLI reads their defaults without torch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 240
    """Prompts built (before the disjointness filter drops any)."""
    max_tokens: int = 128
    """Output tokens per prompt (the benchmark's length)."""
    max_prompt_tokens: int = 512
    """Longer chat-templated prompts are skipped (they would dominate generation and training time)."""
    sample_fraction: float = 0.5
    """Share of prompts continued by sampling (the rest greedily)."""
    temperature: float = 0.8
    seed: int = 0
    batch: int = 16
    """Requests in flight at once."""

    def __post_init__(self):
        if self.num_prompts < 1 or self.max_tokens < 2 or self.batch < 1:
            raise ValueError("num_prompts >= 1, max_tokens >= 2 and batch >= 1 are required")
        if not 0.0 <= self.sample_fraction <= 1.0 or self.temperature <= 0.0:
            raise ValueError("sample_fraction must be in [0, 1] and temperature > 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps (one example each)."""
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.eval_every < 1 or self.checkpoint_every < 1:
            raise ValueError("steps >= 0, lr > 0, eval_every >= 1 and checkpoint_every >= 1 are required")
