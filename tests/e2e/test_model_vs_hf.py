"""Our forward on the real default model (fp32) against HF transformers: logits and greedy generation."""
from __future__ import annotations

import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.types import Request, SamplingParams, ScheduledRequest, SchedulerOutput

pytestmark = pytest.mark.real_model

BLOCK_SIZE = 16
MAX_NEW_TOKENS = 64
CHATS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for staying focused while studying.",
]
PLAIN = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = []
    for text in CHATS:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    out += [tokenizer(text)["input_ids"] for text in PLAIN]
    return out


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(default_model_dir) -> ModelRunner:
    cfg = ModelConfig.from_hf_dir(default_model_dir)
    return ModelRunner(cfg, default_model_dir, CacheConfig(BLOCK_SIZE, 8192))


def _request(rid: str, prompt: list[int], first_block: int) -> Request:
    num_blocks = -(-(len(prompt) + MAX_NEW_TOKENS) // BLOCK_SIZE)
    return Request(rid, list(prompt), len(prompt), SamplingParams(temperature=0.0),
                   block_ids=list(range(first_block, first_block + num_blocks)))


def test_logits_match_hf(runner, hf_model, prompts):
    for i, prompt in enumerate(prompts[:3] + prompts[3:4]):
        req = _request(f"l{i}", prompt, first_block=0)
        inputs = runner.prepare_inputs(SchedulerOutput([ScheduledRequest(req, len(prompt))]))
        hidden = runner.model.forward(inputs.input_ids, inputs.positions, inputs.attn_metadata, runner.kv_caches)
        ours = runner.model.compute_logits(hidden)  # every position, not only the sampled one
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        rel = (ours - expected).abs().max() / expected.abs().max()
        assert rel < 1e-4, f"prompt {i}: relative logit error {rel:.2e}"


def _greedy_batch(runner: ModelRunner, reqs: list[Request], eos_ids: tuple[int, ...]) -> list[list[int]]:
    """All requests in one ragged batch: prefill, then one token per step with argmax, the engine's
    bookkeeping done by hand; a request leaves the batch at EOS or after MAX_NEW_TOKENS."""
    running = {r.request_id: r for r in reqs}
    while running:
        scheduled = [ScheduledRequest(r, r.num_tokens - r.num_computed_tokens) for r in running.values()]
        logits = runner.execute(SchedulerOutput(scheduled)).logits
        for s, row in zip(scheduled, logits):
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            r.token_ids.append(int(row.argmax()))
            if r.token_ids[-1] in eos_ids or r.num_output_tokens == MAX_NEW_TOKENS:
                del running[r.request_id]
    return [r.output_token_ids for r in reqs]


def test_batched_greedy_generation_matches_hf(runner, hf_model, prompts):
    eos_ids = runner.model_config.eos_token_ids
    reqs = [_request(f"g{i}", p, first_block=64 * i) for i, p in enumerate(prompts)]
    ours = _greedy_batch(runner, reqs, eos_ids)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=list(eos_ids),
                                    pad_token_id=eos_ids[0])
        expected = out[0, len(prompt):].tolist()
        first_diff = next((j for j, (a, b) in enumerate(zip(ours[i], expected)) if a != b), None)
        assert ours[i] == expected, f"prompt {i}: {len(ours[i])} vs {len(expected)} tokens, first difference at {first_diff}"
