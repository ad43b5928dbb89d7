"""engine/models/int8_layers.py: an int8 decoding or verification step through the fused C gaps has
the bits of the layer-by-op path (logits and the K/V it stores), so a request stays lossless whichever
path its steps take."""
import pytest
import torch

from engine.config import CacheConfig, ModelConfig
from engine.model_runner import ModelRunner
from engine.models.int8_layers import Int8Layers
from engine.types import DraftTree, Request, SamplingParams, ScheduledRequest, SchedulerOutput
from specd_kernels import backend


@pytest.fixture(scope="module", params=[("int8", "auto"), ("int8-fast", "auto"), ("int8", "fp32")],
                ids=lambda p: f"{p[0]}-kv-{p[1]}")
def runner(request, tiny_model_dir):
    dtype, kv_dtype = request.param  # auto: fp16 K/V where the C kernels convert it
    runner = ModelRunner(ModelConfig.from_hf_dir(tiny_model_dir), tiny_model_dir, CacheConfig(4, 1024, kv_dtype),
                         dtype=dtype)
    if runner.model.int8_layers is None:
        pytest.skip("no C compiler: only the layer-by-op path exists")
    return runner


def _prefilled(runner, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    blocks = iter(range(256))
    reqs = []
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, 49152, (n,), generator=gen).tolist()
        r = Request(f"r{i}", prompt + [11], n, SamplingParams(), block_ids=[next(blocks) for _ in range(12)])
        runner.execute(SchedulerOutput([ScheduledRequest(r, n)]))
        r.num_computed_tokens = n
        reqs.append(r)
    return reqs


def _both_paths(runner, sched, monkeypatch):
    """(logits, K/V caches) of the same step through each path, from the same cache contents."""
    model, saved = runner.model, [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    fused, calls = model.int8_layers, []
    monkeypatch.setattr(fused, "run", lambda *a, _run=fused.run: calls.append(1) or _run(*a))
    results = []
    for layers in (fused, None):
        for (k, v), (k0, v0) in zip(runner.kv_caches, saved):
            k.copy_(k0), v.copy_(v0)
        model.int8_layers = layers
        try:
            logits = runner.execute(sched).logits
        finally:
            model.int8_layers = fused
        results.append((logits, [(k.clone(), v.clone()) for k, v in runner.kv_caches]))
    assert calls == [1], "the step did not take the fused path"
    return results


@pytest.mark.parametrize("drafts", ["decode", "chains", "tree"])
def test_fused_step_has_the_bits_of_the_layer_by_op_path(runner, drafts, monkeypatch):
    reqs = _prefilled(runner, (5, 19, 33, 12), seed=3)
    draft = {"decode": None, "chains": DraftTree([7, 8, 9], [-1, 0, 1]),
             "tree": DraftTree([7, 8, 9, 10, 12], [-1, -1, 0, 0, 1])}[drafts]
    sched = SchedulerOutput([ScheduledRequest(r, 1, draft if i % 2 else None) for i, r in enumerate(reqs)])
    (fused_logits, fused_kv), (ref_logits, ref_kv) = _both_paths(runner, sched, monkeypatch)
    assert torch.equal(fused_logits, ref_logits)
    for (k, v), (k_ref, v_ref) in zip(fused_kv, ref_kv):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_matmuls_on_amx_tiles_give_the_bits_of_fbgemm(runner, monkeypatch):
    """Where AMX runs, the fused path's matmuls are C calls on tiles; against the layer-by-op path with
    every matmul through fbgemm, the step's logits and K/V are the same bits."""
    from engine.models import int8

    assert runner.model.int8_layers.tiled == (int8.amx_library() is not None)
    if not runner.model.int8_layers.tiled:
        pytest.skip("no AMX here: every matmul is fbgemm's already")
    monkeypatch.setattr(int8, "matmul", lambda buf, w: int8._LINEAR_DYNAMIC(buf, w.packed, int8.REDUCE_RANGE))
    reqs = _prefilled(runner, (5, 19, 33, 12), seed=4)
    sched = SchedulerOutput([ScheduledRequest(r, 1, DraftTree([7, 8, 9], [-1, 0, 1]) if i % 2 else None)
                             for i, r in enumerate(reqs)])
    (tiled_logits, tiled_kv), (ref_logits, ref_kv) = _both_paths(runner, sched, monkeypatch)
    assert torch.equal(tiled_logits, ref_logits)
    for (k, v), (k_ref, v_ref) in zip(tiled_kv, ref_kv):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_steps_with_fp32_prompt_rows_or_a_forced_backend_take_the_layer_by_op_path(runner):
    from engine.models.llama import AttentionMetadata
    from specd_kernels.attention.cpu import CpuPlan

    plan = CpuPlan(*[torch.zeros(1, dtype=torch.int32)] * 4, None, None)
    meta = AttentionMetadata(*[torch.zeros(1)] * 4, plan=plan)
    assert Int8Layers.applies(meta)
    meta.prompt_rows = torch.tensor([False, True])
    assert not Int8Layers.applies(meta)
    meta.prompt_rows = None
    backend.set_backend("ref")
    try:
        assert not Int8Layers.applies(meta)
    finally:
        backend.set_backend("auto")
    meta.plan = None
    assert not Int8Layers.applies(meta)
