"""Speculative decoding edge cases (issue 3, "Tests"), in-process with `LLMEngine` and over HTTP.

The tiny random-weight Llama never repeats itself, so prompt lookup would find nothing to draft.
A +100 logit_bias on three word tokens (" cat", " dog", " sat") confines its greedy output to
those words while the model still picks among them (" dog cat dog cat dog dog cat ..."): the n-gram
and Jacobi drafters then propose long drafts that are partly accepted and partly rejected, which is
what the edge cases need. The bias is part of the request, so the target distribution of every row
(drafts included) is biased the same way and greedy speculation must stay token-identical to
`--spec none`.

`spec_adaptive=False` everywhere: every proposed draft is verified.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
from dataclasses import dataclass, field, replace

import httpx
import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.types import EngineRequest, FinishReason, SamplingParams, SpecParams, SpecUsage

WORDS = {" cat": 2644, " dog": 2767, " sat": 2643}
BIAS = {token_id: 100.0 for token_id in WORDS.values()}
METHODS = ("none", "ngram", "jacobi")
# Their greedy outputs switch words at different depths, e.g. " dog x6, sat x8, dog x11, sat ...".
BIASED_TEXTS = (" dog cat sat cat dog", " cat cat dog sat", " cat dog cat dog cat", " sat")
PLAIN_TEXTS = ("The cat sat on the mat.", "def f(x):\n    return x\n")
NUM_DRAFT_TOKENS = 5


@dataclass
class Result:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: FinishReason | None = None
    error: str | None = None
    spec: SpecUsage = field(default_factory=SpecUsage)
    blocks: list[list[int]] = field(default_factory=list)
    """new_token_ids of each step's output: a step that accepted k drafts emits a block of k + 1."""

    def inside_blocks(self) -> set[int]:
        """Output positions that are not the last of their step's block (accepted drafts)."""
        inside, pos = set(), 0
        for block in self.blocks:
            inside.update(range(pos, pos + len(block) - 1))
            pos += len(block)
        return inside


def run(engine: LLMEngine, requests: list[EngineRequest], on_step=None) -> dict[str, Result]:
    """Submit all requests at once and step until everything finished; on_step(step_index) runs
    before each step (to abort or to record stats)."""
    results = {r.request_id: Result() for r in requests}
    for r in requests:
        engine.add_request(r)
    step = 0
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(step)
        for o in engine.step():
            res = results[o.request_id]
            res.ids += o.new_token_ids
            res.text += o.new_text
            if o.new_token_ids:
                res.blocks.append(list(o.new_token_ids))
            if o.finished:
                res.reason, res.error, res.spec = o.finish_reason, o.error, o.spec
        step += 1
    assert all(r.reason is not None for r in results.values())
    return results


def greedy(max_tokens: int = 24, biased: bool = True, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=BIAS if biased else {}, **kw)


def request(rid: str, prompt: list[int], sampling: SamplingParams, method: str = "none") -> EngineRequest:
    return EngineRequest(rid, list(prompt), sampling, SpecParams(method=method))


_solo_cache: dict[str, Result] = {}


def solo(engine: LLMEngine, prompt: list[int], sampling: SamplingParams) -> Result:
    """The request alone with --spec none (cached: greedy is deterministic)."""
    key = repr((prompt, sampling))
    if key not in _solo_cache:
        _solo_cache[key] = run(engine, [request("solo", prompt, sampling)])["solo"]
    return _solo_cache[key]


def assert_same(got: Result, want: Result, what: str) -> None:
    assert got.error is None, (what, got.error)
    assert got.ids == want.ids, f"{what}: {got.ids} != {want.ids}"
    assert got.text == want.text, what
    assert got.reason == want.reason, what


def _make_engine(model_dir, **overrides) -> LLMEngine:
    config = dict(model=str(model_dir), spec="none", spec_adaptive=False, num_draft_tokens=NUM_DRAFT_TOKENS,
                  num_threads=1)
    config.update(overrides)
    return LLMEngine(EngineConfig(**config))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    threads = torch.get_num_threads()
    yield _make_engine(tiny_model_dir)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(engine) -> list[tuple[list[int], bool]]:
    """(prompt token ids, biased?)"""
    return ([(engine.tokenizer.encode(t), True) for t in BIASED_TEXTS]
            + [(engine.tokenizer.encode(t), False) for t in PLAIN_TEXTS])


def mixed_batch(prompts, max_tokens: int = 24) -> list[tuple[EngineRequest, SamplingParams, list[int]]]:
    out = []
    for i, (prompt, biased) in enumerate(prompts):
        sampling = greedy(max_tokens, biased)
        for method in METHODS:
            out.append((request(f"{method}-{i}", prompt, sampling, method), sampling, prompt))
    return out


# ---------------------------------------------------------------- in-process


def test_mixed_methods_and_zero_draft_requests_in_one_batch_equal_solo(engine, prompts):
    batch = mixed_batch(prompts)
    steps_mixing = []

    def record(step):
        if step > 0:
            drafts = [rec.num_draft for rec in engine.last_stats.spec]
            steps_mixing.append(0 in drafts and any(d > 0 for d in drafts))

    results = run(engine, [r for r, _, _ in batch], on_step=record)
    for req, sampling, prompt in batch:
        assert_same(results[req.request_id], solo(engine, prompt, sampling), req.request_id)
    ngram_biased = [results[f"ngram-{i}"].spec for i in range(len(BIASED_TEXTS))]
    assert all(s.draft_tokens > 0 and s.accepted_tokens > 0 for s in ngram_biased), ngram_biased
    assert any(s.accepted_tokens < s.draft_tokens for s in ngram_biased), "no draft was ever rejected"
    assert sum(results[f"jacobi-{i}"].spec.accepted_tokens for i in range(len(BIASED_TEXTS))) > 0
    assert all(results[f"none-{i}"].spec.draft_tokens == 0 for i in range(len(prompts)))
    assert any(steps_mixing), "no step verified drafted and zero-draft requests together"
    assert engine.kv.usage == 0


def test_penalties_see_accepted_drafts_as_history(engine, prompts):
    # A draft row's penalties must count the drafts before it on its path, as plain decoding would
    # count them once generated; otherwise the penalised argmax differs and output diverges.
    sampling = greedy(max_tokens=24, frequency_penalty=0.7, presence_penalty=0.3)
    for method in ("ngram", "jacobi"):
        spec_total = 0
        for i, (prompt, _) in enumerate(prompts):
            got = run(engine, [request(f"pen-{method}-{i}", prompt, sampling, method)])[f"pen-{method}-{i}"]
            assert_same(got, solo(engine, prompt, sampling), f"{method} with penalties, prompt {i}")
            spec_total += got.spec.accepted_tokens
        assert spec_total > 0, f"{method} accepted no draft, so the penalised draft rows were never tested"


def test_drafts_never_cross_max_tokens(engine, prompts):
    batch = []
    for max_tokens in (1, 2, 3, 4, 7):
        for i, (prompt, _) in enumerate(prompts[:len(BIASED_TEXTS)]):
            sampling = greedy(max_tokens)
            for method in ("ngram", "jacobi"):
                batch.append((request(f"{method}-{i}-{max_tokens}", prompt, sampling, method), sampling, prompt))
    results = run(engine, [r for r, _, _ in batch])
    for req, sampling, prompt in batch:
        got = results[req.request_id]
        assert len(got.ids) == sampling.max_tokens and got.reason == FinishReason.LENGTH, (req.request_id, got)
        assert_same(got, solo(engine, prompt, sampling), req.request_id)
        want_long = solo(engine, prompt, greedy(24))
        assert got.ids == want_long.ids[:sampling.max_tokens]
    # From max_tokens 3 on there is room for drafts after the first token (the bonus lands last).
    long_ones = [results[r.request_id].spec for r, s, _ in batch if s.max_tokens >= 4]
    assert sum(s.accepted_tokens for s in long_ones) > 0


def test_drafts_never_cross_the_context_window(engine, prompts, monkeypatch):
    prompt = prompts[0][0]
    monkeypatch.setattr(engine, "max_model_len", len(prompt) + 6)
    want = solo(engine, prompt, greedy(24))
    results = run(engine, [request(m, prompt, greedy(24), m) for m in ("ngram", "jacobi")])
    for method, got in results.items():
        assert got.reason == FinishReason.LENGTH and got.ids == want.ids[:6], (method, got)
    assert results["ngram"].spec.accepted_tokens > 0
    assert engine.kv.usage == 0


# Configurations whose outputs change words at various depths; with only " cat" and " dog" allowed,
# the model alternates for a while, so n-gram drafts copied from the prompt hold a token's (or a stop
# string's) FIRST occurrence inside an accepted block.
STOP_CONFIGS = ((" cat dog cat dog cat", (" cat", " dog")), (" cat cat dog sat", (" cat", " dog")),
                (" dog dog cat", (" cat", " dog")), (" cat cat dog sat", tuple(WORDS)),
                (" dog cat sat cat dog", tuple(WORDS)))


def _stop_config_runs(engine, max_tokens: int = 32):
    """(prompt, sampling, ngram result) per STOP_CONFIGS entry."""
    out = []
    for text, words in STOP_CONFIGS:
        prompt = engine.tokenizer.encode(text)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias={WORDS[w]: 100.0 for w in words})
        out.append((prompt, sampling, run(engine, [request("probe", prompt, sampling, "ngram")])["probe"]))
    return out


def test_stop_strings_inside_drafts_truncate_like_plain_decoding(engine):
    cases = []  # (prompt, sampling, stop, full ngram result)
    for prompt, sampling, full in _stop_config_runs(engine):
        inside = full.inside_blocks()
        for j in range(1, len(full.ids)):
            stop = engine.tokenizer.decode(full.ids[j - 1:j + 1])
            end = len(engine.tokenizer.decode(full.ids[:j + 1]))
            # The stop string's first occurrence must end with token j, an accepted draft.
            if j in inside and full.text.find(stop) + len(stop) == end and stop.strip():
                cases.append((prompt, sampling, stop, full))
                break
    assert len(cases) >= 2, "no stop string falls inside an accepted block"
    batch = [request(f"{m}-{k}", prompt, replace(sampling, stop=(stop,)), m)
             for k, (prompt, sampling, stop, _) in enumerate(cases) for m in ("ngram", "jacobi")]
    results = run(engine, batch)
    for k, (prompt, sampling, stop, full) in enumerate(cases):
        want = solo(engine, prompt, replace(sampling, stop=(stop,)))
        assert want.reason == FinishReason.STOP and want.text == full.text[:full.text.find(stop)], (stop, want)
        for m in ("ngram", "jacobi"):
            assert_same(results[f"{m}-{k}"], want, f"{m} stop {stop!r}")


def _stop_token_case(engine):
    """(prompt, sampling, token, full ngram result): the token's first output occurrence is an
    accepted draft of the ngram run."""
    for prompt, sampling, full in _stop_config_runs(engine):
        inside = full.inside_blocks()
        first = {}
        for j, t in enumerate(full.ids):
            first.setdefault(t, j)
        for token, j in first.items():
            if j in inside:
                return prompt, sampling, token, full
    pytest.fail("no token's first occurrence falls inside an accepted block")


def test_stop_token_ids_inside_drafts_truncate_like_plain_decoding(engine):
    prompt, sampling, token, full = _stop_token_case(engine)
    sampling = replace(sampling, stop_token_ids=(token,))
    want = solo(engine, prompt, sampling)
    assert want.reason == FinishReason.STOP and want.ids == full.ids[:full.ids.index(token) + 1]
    results = run(engine, [request(m, prompt, sampling, m) for m in ("ngram", "jacobi")])
    for m, got in results.items():
        assert_same(got, want, m)


def test_eos_inside_drafts_truncates_like_plain_decoding(engine, monkeypatch):
    prompt, sampling, token, full = _stop_token_case(engine)
    monkeypatch.setattr(engine, "eos_token_ids", {token})  # the random model never picks its real EOS
    want = run(engine, [request("none", prompt, sampling)])["none"]
    assert want.reason == FinishReason.STOP and want.ids == full.ids[:full.ids.index(token) + 1]
    results = run(engine, [request(m, prompt, sampling, m) for m in ("ngram", "jacobi")]
                  + [request("ignore", prompt, replace(sampling, ignore_eos=True), "ngram")])
    for m in ("ngram", "jacobi"):
        assert_same(results[m], want, m)
    assert results["ignore"].ids == full.ids and results["ignore"].reason == FinishReason.LENGTH


def test_one_token_prompts(engine):
    prompts = [[WORDS[" cat"]], [WORDS[" dog"]], [1], [42]]
    batch = [(request(f"{m}-{i}-{b}", p, greedy(16, b), m), greedy(16, b), p)
             for i, p in enumerate(prompts) for b in (True, False) for m in METHODS]
    results = run(engine, [r for r, _, _ in batch])
    for req, sampling, prompt in batch:
        assert_same(results[req.request_id], solo(engine, prompt, sampling), req.request_id)
    assert sum(results[r.request_id].spec.accepted_tokens for r, _, _ in batch) > 0


def test_abort_mid_batch(engine, prompts):
    batch = mixed_batch(prompts[:3], max_tokens=32)
    doomed = {"ngram-0": 3, "jacobi-1": 2, "none-2": 4, "ngram-2": 0}  # request -> step to abort before
    aborted_at = {}

    def abort(step):
        for rid, at in doomed.items():
            if step == at:
                req = engine.scheduler.get(rid)
                if rid != "ngram-2":  # the others are mid-generation with drafts in flight
                    assert req is not None and req.num_output_tokens > 0, rid
                engine.abort_request(rid)
                engine.abort_request(rid)  # twice: a no-op
                aborted_at[rid] = step
        engine.abort_request("no-such-request")

    # "ngram-2" is aborted before the first step, while still waiting.
    results = run(engine, [r for r, _, _ in batch], on_step=abort)
    assert set(aborted_at) == set(doomed)
    for req, sampling, prompt in batch:
        got = results[req.request_id]
        if req.request_id in doomed:
            assert got.reason == FinishReason.ABORT and got.error is None, (req.request_id, got)
            assert len(got.ids) < sampling.max_tokens
            assert got.ids == solo(engine, prompt, sampling).ids[:len(got.ids)]
        else:
            assert_same(got, solo(engine, prompt, sampling), req.request_id)
    assert not engine.has_unfinished_requests()
    assert engine.kv.usage == 0


@pytest.mark.parametrize("layout", ["ragged", "padded-kv"])  # padded-kv: padding slots take cache room too
def test_preemption_while_drafting(tiny_model_dir, engine, prompts, layout):
    small = _make_engine(tiny_model_dir, spec="ngram", cache=CacheConfig(block_size=16, num_tokens=256),
                         scheduler=SchedulerConfig(max_num_batched_tokens=128), spec_layout=layout)
    # 8 requests x (5-10 prompt + 48 output) tokens need ~450 slots; the cache holds 256.
    batch = [(request(f"r{i}", prompt, greedy(48), "ngram"), prompt)
             for i, (prompt, _) in enumerate(prompts[:3] * 3) if i < 8]
    preemptions, padding = [], []
    drafted_before_preemption = set()

    def record(step):
        if step > 0:
            preemptions.append(small.last_stats.num_preemptions)
        for r in small.scheduler.running:
            if r.spec_usage.draft_tokens > 0:
                drafted_before_preemption.add(r.request_id)
            padding.append(len(r.kv_padding))

    results = run(small, [r for r, _ in batch], on_step=record)
    preemptions.append(small.last_stats.num_preemptions)
    assert sum(preemptions) > 0, "the small cache never preempted anything"
    for req, prompt in batch:
        got = results[req.request_id]
        assert_same(got, solo(engine, prompt, greedy(48)), req.request_id)
        assert got.spec.accepted_tokens > 0
    assert drafted_before_preemption
    assert (max(padding) > 0) == (layout == "padded-kv")
    assert small.kv.usage == 0 and not small.has_unfinished_requests()


@pytest.mark.parametrize("layout", ["padded", "padded-kv"])
def test_padded_layouts_give_the_same_greedy_outputs(tiny_model_dir, engine, prompts, layout):
    """padded-kv also keeps hidden padding slots in the cache (EMS-SD's vanilla baseline): outputs
    must not change, and the slots must really be there and be read."""
    padded = _make_engine(tiny_model_dir, spec_layout=layout)
    batch = mixed_batch(prompts)
    most_padding = []
    got = run(padded, [r for r, _, _ in batch],
              on_step=lambda step: most_padding.append(max((len(r.kv_padding) for r in padded.scheduler.running),
                                                           default=0)))
    assert (max(most_padding) > 0) == (layout == "padded-kv")
    ragged = run(engine, [request(r.request_id, r.prompt_token_ids, s, r.spec.method) for r, s, _ in batch])
    for req, sampling, prompt in batch:
        assert_same(got[req.request_id], ragged[req.request_id], req.request_id)
        assert_same(got[req.request_id], solo(engine, prompt, sampling), req.request_id)
    assert sum(got[f"ngram-{i}"].spec.accepted_tokens for i in range(len(BIASED_TEXTS))) > 0
    assert padded.kv.usage == 0


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def spec_server(start_server):
    return start_server("--spec", "ngram", "--no-spec-adaptive", "--num-threads", "1")


BIAS_JSON = {str(t): 100 for t in WORDS.values()}


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"max_tokens": 16, **body}, timeout=120)


def test_http_n2_with_seed_is_reproducible(spec_server):
    body = dict(prompt=" cat dog cat dog cat", n=2, seed=7, temperature=1, max_tokens=24, logit_bias=BIAS_JSON,
                speculative={"method": "ngram"})
    first, second = completion(spec_server.url, **body), completion(spec_server.url, **body)
    assert first.status_code == 200 and second.status_code == 200, first.text
    a, b = first.json(), second.json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert a["choices"][0]["text"] != a["choices"][1]["text"], "the two choices must use different seeds"
    assert a["usage"]["speculative"]["draft_tokens"] > 0
    for choice in a["choices"]:
        assert choice["speculative"]["steps"] > 0


def test_http_usage_speculative_reports_drafts(spec_server):
    resp = completion(spec_server.url, prompt=" dog dog sat cat dog dog sat cat", temperature=0, max_tokens=24,
                      logit_bias=BIAS_JSON, speculative={"method": "ngram", "num_draft_tokens": 4})
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]["speculative"]
    assert usage["steps"] > 0 and usage["draft_tokens"] > 0, usage
    assert usage["draft_tokens"] <= 4 * usage["steps"]
    assert usage["accepted_tokens"] > 0
    assert usage["mean_acceptance_length"] == pytest.approx(
        (usage["accepted_tokens"] + usage["steps"]) / usage["steps"], abs=1e-3)
    # The same request with speculation off: same text, no drafts.
    plain = completion(spec_server.url, prompt=" dog dog sat cat dog dog sat cat", temperature=0, max_tokens=24,
                       logit_bias=BIAS_JSON, speculative={"method": "none"})
    assert plain.json()["choices"][0]["text"] == resp.json()["choices"][0]["text"]
    assert plain.json()["usage"]["speculative"]["draft_tokens"] == 0


def test_http_stream_final_chunk_carries_speculative_usage(spec_server):
    body = {"prompt": " cat dog cat dog cat", "temperature": 0, "max_tokens": 16, "logit_bias": BIAS_JSON,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{spec_server.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: "):]))
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["speculative"]["draft_tokens"] > 0, chunks[-1]


def test_http_unknown_method_is_a_400_naming_the_param(spec_server):
    resp = completion(spec_server.url, prompt="x", speculative={"method": "bogus"})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "speculative.method" and "bogus" in err["message"], err
    assert completion(spec_server.url, prompt="x", speculative={"method": "ngram"}).status_code == 200


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_http_disconnect_mid_batch_while_drafting(spec_server):
    """A streaming client goes away while its request drafts beside others; the others still
    produce their solo output and the KV cache empties."""
    others = [dict(prompt=p, temperature=0, max_tokens=32, logit_bias=BIAS_JSON) for p in BIASED_TEXTS]
    solo_texts = [completion(spec_server.url, **o).json()["choices"][0]["text"] for o in others]
    before = _metric(spec_server.metrics(), "specd_request_finished_total", '{finish_reason="abort"}')
    long_body = {"prompt": " cat dog cat dog cat", "temperature": 0, "max_tokens": 1500, "ignore_eos": True,
                 "logit_bias": BIAS_JSON, "stream": True}
    with cf.ThreadPoolExecutor(len(others)) as pool:
        with httpx.stream("POST", f"{spec_server.url}/v1/completions", json=long_body, timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert any(line.startswith("data: {") for _, line in zip(range(4), lines))
            futures = [pool.submit(completion, spec_server.url, **o) for o in others]
            assert any(line.startswith("data: {") for _, line in zip(range(4), lines))
        texts = [f.result().json()["choices"][0]["text"] for f in futures]
    assert texts == solo_texts
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = spec_server.metrics()
        if (_metric(text, "specd_request_finished_total", '{finish_reason="abort"}') > before
                and _metric(text, "specd_requests_running") == 0 and _metric(text, "specd_kv_cache_usage_ratio") == 0):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"no abort / KV cache not empty after the disconnect:\n{spec_server.metrics()}")


def test_cost_calibration_times_decode_and_verify_rows(engine, monkeypatch):
    """The controller's cost curve is timed on the rows a verify step has: int8's fp32 prompt path
    made every calibrated point 2-3x a real verify step's, and the controller stopped drafting."""
    seen, execute = [], engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute",
                        lambda sched: seen.append(engine.runner.prepare_inputs(sched)) or execute(sched))
    free = engine.kv.num_free_blocks
    engine._forward_rows(4)
    assert engine.kv.num_free_blocks == free
    (inputs,) = seen
    assert inputs.input_ids.numel() == 4 and inputs.sample_rows.numel() == 4
    assert inputs.attn_metadata.prompt_rows is None
