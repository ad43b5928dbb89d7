"""The engine's own calls reach the Triton kernels through the dispatch and agree with the CPU path:
a tiny Llama's ragged step (prefill chunk + tree verify), KV compaction of the accepted path, and
batched verification. On CUDA this is the `--device cuda` code path; here it runs interpreted."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.config import CacheConfig, ModelConfig  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.speculation import accepted_path_moves  # noqa: E402
from engine.types import (DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput,  # noqa: E402
                          VerifyResult)
from engine.verifier import verify  # noqa: E402
from specd_kernels import backend  # noqa: E402

BLOCK_SIZE = 4


def _requests():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (13, 9)]
    blocks = iter([7, 2, 11, 5, 0, 9, 3, 14, 1, 6, 12, 4, 8, 10])  # interleaved, out of order
    return [Request(f"r{i}", p, len(p), SamplingParams(), block_ids=[next(blocks) for _ in range(6)])
            for i, p in enumerate(prompts)]


def _run(runner, draft):
    """Step 1: a whole prompt and a chunk; step 2: decode + tree draft next to the rest of the chunk."""
    a, b = _requests()
    runner.execute(SchedulerOutput([ScheduledRequest(a, 12), ScheduledRequest(b, 5)]))
    a.num_computed_tokens, b.num_computed_tokens = 12, 5
    step = [ScheduledRequest(a, 1, draft), ScheduledRequest(b, 4)]
    return runner.execute(SchedulerOutput(step)).logits, step


def test_model_step_and_compaction_through_triton(tiny_model_dir, monkeypatch, device):
    cfg = ModelConfig.from_hf_dir(tiny_model_dir)
    x, y, z, w = 101, 202, 303, 404
    draft = DraftTree([x, y, z, w], [-1, -1, 1, 2])  # a sibling branch: the tree mask is exercised
    calls = _spy_on_kernels(monkeypatch)
    runners, logits = [], []
    for name in ("ref", "triton"):
        monkeypatch.setattr(backend, "_backend", name)
        runner = ModelRunner(cfg, tiny_model_dir, CacheConfig(BLOCK_SIZE, 64), device=device, linear_backend="dense")
        out, step = _run(runner, draft)
        runners.append(runner)
        logits.append(out)
    torch.testing.assert_close(logits[1].cpu(), logits[0].cpu(), atol=1e-4, rtol=1e-4)
    num_layers = cfg.num_layers
    assert calls == {"paged_attention": 2 * num_layers, "store_kv": 2 * num_layers}  # triton's 2 steps only

    # Accept the branch y -> z -> w: its K/V move down onto the slots right after the root.
    result = VerifyResult("r0", [y, z, w, 5], 4, 3, [1, 2, 3])
    src, dst = accepted_path_moves(step[0], result)
    assert src
    slots = []
    for name, runner in zip(("ref", "triton"), runners):
        monkeypatch.setattr(backend, "_backend", name)
        table = step[0].request.block_ids
        flat = lambda idx: [table[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE for i in idx]  # noqa: E731
        runner.copy_kv_slots(flat(src), flat(dst))
        slots.append([torch.cat([k.view(-1), v.view(-1)]) for k, v in runner.kv_caches])
    for ref_layer, triton_layer in zip(*slots):
        torch.testing.assert_close(triton_layer.cpu(), ref_layer.cpu(), atol=1e-5, rtol=1e-5)
    assert calls["copy_slots"] == num_layers


def _spy_on_kernels(monkeypatch) -> dict[str, int]:
    """Count calls of the Triton launchers (the dispatch looks them up at call time)."""
    from specd_kernels.attention import triton as attention_triton
    from specd_kernels.kv_cache_ops import triton as kv_triton

    calls: dict[str, int] = {}
    for module, name in ((attention_triton, "paged_attention"), (kv_triton, "store_kv"), (kv_triton, "copy_slots")):
        def spy(*args, _original=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    return calls


def test_verify_dispatches_to_the_kernel(monkeypatch, device):
    """`verify` on tensors the kernel backend takes runs specd_kernels/rejection, with the same results:
    greedy requests exactly, sampled ones too where one-hot targets make sampling deterministic."""
    import engine.verifier as verifier

    gen = torch.Generator().manual_seed(1)
    trees = [DraftTree([3, 4, 4], [-1, 0, 0]), None, DraftTree([1], [-1]), DraftTree([2, 2, 7, 1], [-1, 0, 1, 1])]
    cu_rows = [0]
    for tree in trees:
        cu_rows.append(cu_rows[-1] + 1 + (len(tree) if tree else 0))
    target = torch.randint(0, 8, (cu_rows[-1],), generator=gen)
    target[[0, 1, 7, 8]] = torch.tensor([3, 4, 2, 2])  # make some paths long
    target = target.to(device)
    probs = torch.nn.functional.one_hot(target, 8).float()
    ids = [str(i) for i in range(4)]
    greedy = [True, False, True, False]
    expected = verify(ids, trees, cu_rows, greedy, target, probs, [torch.Generator().manual_seed(i) for i in range(4)])
    assert sum(r.num_accepted for r in expected) >= 3

    original, calls = verifier._verify_batched, []
    monkeypatch.setattr(verifier, "_verify_batched", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(backend, "_backend", "triton")
    got = verify(ids, trees, cu_rows, greedy, target, probs, [torch.Generator().manual_seed(i) for i in range(4)])
    assert calls and got == expected
