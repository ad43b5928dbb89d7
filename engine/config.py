"""Engine configuration: frozen dataclasses, one per part (configs/*.yaml map onto them 1:1).

Pure Python (no torch): the server and CLI build these before the engine exists.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine.spec.controller import FAIRNESS

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SPEC_METHODS = ("none", "ngram", "jacobi", "pass", "bpd", "recycle")
TRAINED_METHODS = ("pass", "bpd", "recycle")
"""Methods whose drafter needs a trained artifact; their extra logits rows exist in the ragged layout only."""
SPEC_LAYOUTS = ("ragged", "padded", "padded-kv")
PADDED_KV_NEEDS_CPU = "--spec-layout padded-kv runs on the CPU attention kernels only"
PASS_MODES = ("fused", "two_call", "branch")


DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "int8-fast")
"""int8: int8 weights (the layers that need it split in two, engine/models/int8.py), meets the quality
bar; int8-fast: every weight int8 once, faster and less exact. Both compute in fp32 otherwise."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model, read from its HF config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Qwen2 has biases on q/k/v projections."""
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> "ModelConfig":
        hf = json.loads((Path(model_dir) / "config.json").read_text())
        rope = hf.get("rope_parameters") or {}
        if (hf.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
            raise ValueError("rope scaling is not supported yet")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
        )


KV_CACHE_DTYPES = ("auto", "fp32", "fp16")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_tokens: int = 32768
    """KV cache capacity in tokens (--kv-cache-tokens); rounded down to whole blocks.
    The default model needs 45 KiB per token in fp32 (30 layers x K and V x 3 heads x 64), so the
    default cache takes 1.4 GiB; 0.7 GiB in fp16."""
    dtype: str = "auto"
    """K/V cache dtype (--kv-cache-dtype): auto | fp32 | fp16. auto: fp16 for the int8 dtypes on a
    CPU whose C kernels can convert it (F16C), else the activations' dtype (fp32 keeps `--dtype fp32`
    equal to HF transformers). Measurements: engine/model_runner.py kv_cache_dtype."""

    def __post_init__(self):
        if self.block_size <= 0 or self.num_tokens < self.block_size:
            raise ValueError("kv cache must hold at least one block")
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {self.dtype!r}")

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_size


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most requests running at once (--max-num-seqs)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step; longer prompts are prefilled in chunks (--max-num-batched-tokens).
    Decoding requests sharing a step with a prefill chunk stall for it: on the 2-core Intel AVX-512
    guest (int8, bf16 prompt rows) a step of ~500 prompt tokens and 15 decoding rows took ~190 ms
    (~150 ms at 256). 512 over 256 there, engine only, 30 Spec-Bench prompts: 16 clients 188.6 ->
    203.8 tok/s, one client's prompts 4.46 -> 4.11 s in all (bigger bf16 calls, fewer steps);
    1024 gained nothing more. Where prompt rows run in fp32 (no AMX) their linears cost ~2.7x the
    bf16 ones (151 against 56 ms per 256 rows there): lower it when inter-token latency matters more
    than throughput."""
    max_model_len: int = 8192
    """Prompt + output tokens of one request (the context window)."""
    max_queue: int = 256
    """Waiting requests beyond which new ones are refused with 429 (--max-queue)."""

    def __post_init__(self):
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_queue < 0:
            raise ValueError("scheduler limits must be positive")


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    """The default model's name, or a local HF model directory."""
    device: str = "auto"
    """auto | cpu | cuda"""
    dtype: str = "auto"
    """auto | fp32 | bf16 | fp16 | int8 | int8-fast (auto: int8 on CPU, bf16 on CUDA)"""
    spec: str = "ngram"
    """Server-wide speculation method (--spec); a request may pick another in its `speculative` field.
    ngram by default: on the CPU default (int8, --spec-fairness 0.99) it measured 1.35x `none` at batch
    1 and no Spec-Bench category under 0.97x at 4-16 clients (spec_cpu.txt, session 20); output is
    the same tokens (lossless)."""
    num_draft_tokens: int = 5
    """Most draft tokens a request proposes per step (--num-draft-tokens); the controller may use fewer."""
    ngram_cutoff: float = 0.15
    """Prompt lookup drafts a copied token only while the chance that it and the copy's tokens before
    it are accepted, measured on the server's own copies by match length, is at least this
    (--ngram-cutoff; 0: always copy k tokens, as LLMA does; engine/spec/ngram.py)."""
    spec_layout: str = "ragged"
    """ragged (EMS-SD: unpadded inputs, unpadded KV cache) | padded (inputs padded to the batch's longest
    draft) | padded-kv (EMS-SD's vanilla baseline: padded inputs, and a cache that grows by the batch's
    best acceptance, the others' extra slots kept as hidden padding; CPU only). Padded ones are for
    benchmarks only."""
    spec_adaptive: bool = True
    """Let the cost controller cut drafts (to zero) where they don't pay; False verifies every draft."""
    spec_fairness: float = FAIRNESS
    """The least expected decoding rate, over its plain rate, a draft plan may leave any request of
    the batch (engine/spec/controller.py); lower lets good drafts slow their neighbours for more
    throughput (0: the batch's tokens alone; measured trade-offs: README, spec_cpu.txt sessions 15-20)."""
    jacobi_config: str | None = None
    """YAML file for the TR-Jacobi tree shape (default: configs/spec/jacobi.yaml)."""
    pass_artifact: str | None = None
    """PaSS look-ahead embeddings (default: artifacts/pass/<model name>.safetensors when present)."""
    pass_mode: str = "two_call"
    """two_call (the paper's draft, then verify) | fused (look-ahead rows ride in the verify pass, after
    the drafts) | branch (they ride in it beside the drafts, after the last real token; see
    engine/spec/lookahead.py). two_call by measurement on the dev CPU (benchmarks/results/pass_cpu.txt)."""
    pass_lookahead: int = 2
    """PaSS look-ahead rows per step, L (at most the artifact's; --num-draft-tokens caps it too). 2 by
    measurement for the default model. Unrefined, its 2nd look-ahead draft is right after a right 1st
    one for under 2% of held-out roots (artifacts/README.md), and refined over the rows' top 4 alone
    L 2 ran 1.07x `none` against L 1's 1.16x; with the LM's candidates in the lattice L 2 accepts 0.88
    drafts per validation against L 1's 0.53 (teacher-forced) and ran 1.30x against 1.25x at batch 1
    (fp32, engine only; benchmarks/results/refine_lm_cpu.txt)."""
    bpd_artifact: str | None = None
    """Blockwise Parallel Decoding heads (default: artifacts/bpd/<model name>.safetensors when present)."""
    refine_weight: float = 3.0
    """The n-gram LM's weight when BPD and PaSS drafts are refined (engine/spec/refine.py); 0: the
    heads' and look-ahead rows' own drafts. 3 by teacher-forced measurement (benchmarks/refine.py):
    with the LM's own candidates in the lattice, 1 / 2 / 3 accepted 0.48 / 0.52 / 0.53 PaSS drafts
    per step and 0.39 / 0.61 / 0.74 BPD ones (rows' top 4 alone: 1 and 2 the same, 0.33 and 0.23)."""
    refine_lm_candidates: int = 4
    """Each lattice row offers the n-gram LM's likeliest next tokens too, beside the row's own top 4
    (engine/spec/refine.py); 0: the paper's lattice of the rows' top-k alone."""
    refine_paths: int = 1
    """Best lattice paths a refined BPD request drafts, as a tree (the paper's p-best); 1: a chain.
    PaSS always drafts one (its fused mode appends look-ahead rows after a chain)."""
    refine_ngram_data: str | None = None
    """Self-distilled records (engine/train/data.py) for refinement's global n-gram LM (default: the
    committed artifacts/pass/<model name>.data.jsonl when present; "": the request's own text alone)."""
    recycle_artifact: str | None = None
    """RecycleGPT's recyclable module (default: artifacts/recycle/<model name>.safetensors when present)."""
    recycle_lossy: bool = False
    """The paper's alternating decoding: each step keeps one module token unverified (faster, and the
    output is no longer exactly the model's; engine/spec/recycle.py)."""
    cache_dir: str | None = None
    """Where the dequantized default model is cached (default ~/.cache/specd or $SPECD_CACHE)."""
    num_threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.spec not in SPEC_METHODS:
            raise ValueError(f"unknown speculation method {self.spec!r}; choose from {', '.join(SPEC_METHODS)}")
        if self.spec_layout not in SPEC_LAYOUTS:
            raise ValueError(f"spec_layout must be one of {', '.join(SPEC_LAYOUTS)}, not {self.spec_layout!r}")
        if self.spec_layout == "padded-kv" and self.device == "cuda":  # --device auto: the engine checks
            raise ValueError(PADDED_KV_NEEDS_CPU)
        if self.pass_mode not in PASS_MODES:
            raise ValueError(f"pass_mode must be one of {', '.join(PASS_MODES)}, not {self.pass_mode!r}")
        if self.pass_lookahead < 1:
            raise ValueError("pass_lookahead must be >= 1")
        if self.spec in TRAINED_METHODS and self.spec_layout != "ragged":
            raise ValueError(f"--spec {self.spec} is not available with --spec-layout {self.spec_layout}")
        if not 0.0 <= self.spec_fairness <= 1.0:
            raise ValueError(f"spec_fairness must be between 0 and 1, not {self.spec_fairness!r}")
        if self.refine_weight < 0 or self.refine_paths < 1 or self.refine_lm_candidates < 0:
            raise ValueError("refine_weight must be >= 0, refine_paths >= 1 and refine_lm_candidates >= 0")
        if not 0.0 <= self.ngram_cutoff <= 1.0:
            raise ValueError(f"ngram_cutoff must be between 0 and 1, not {self.ngram_cutoff!r}")
        if not 0 <= self.num_draft_tokens <= 64:
            raise ValueError("num_draft_tokens must be between 0 and 64")

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        """Build from a nested dict (a parsed configs/*.yaml), rejecting unknown keys."""
        d = dict(d)
        parts = {"cache": CacheConfig, "scheduler": SchedulerConfig}
        for key, part_cls in parts.items():
            if key in d:
                d[key] = _strict(part_cls, d[key])
        return _strict(cls, d)


def _strict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**d)
