"""The linear-layer backends of engine/models/llama.py, all behind one call signature:
`linear(x, weight, bias, norm=(weight, eps) applied to x first, residual that receives the output in place)`.

- fp32: F.linear (MKL), oneDNN with pre-packed weights, or specd's own weight-stationary kernel
  (specd_kernels/f32_matmul: a row's bits never depend on the other rows), whichever `measure_backends`
  finds fastest on this machine at load time. On a 2-core Intel KVM guest the default model's linears
  took 21.6 / 52.7 ms for 1 / 8 rows with F.linear, 25.2 / 32.4 with oneDNN, 20.3 / 24.8 with
  f32_matmul: its verify steps cost little more than a decode step.
- int8 dtypes: `PromptRowsDense`, which runs prompt-token rows through a dense oneDNN linear (bf16 in
  calls of 64-192 rows where the CPU has AMX and that measures faster, else fp32) and every other row
  (decoding, drafts, look-ahead rows) through the int8 layer of engine/models/int8.py.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from engine.models.int8 import Int8Weight, RowScaledInt8Linear
from specd_kernels.bf16_rows import cpu as bf16_rows
from specd_kernels.f32_matmul import cpu as f32_matmul

log = logging.getLogger(__name__)

_LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default  # the overload: no per-call Python dispatch checks


def dense_linear(x, weight, bias):
    return F.linear(x, weight, bias)


def onednn_linear(x, weight, bias):
    # weight was packed by pack_onednn; x stays a plain dense tensor.
    return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")


def onednn_linear_two_rows(x, weight, bias):
    """onednn_linear never called with one row: a lone row goes in twice and one copy comes out.

    Why: oneDNN picks its kernel by row count, and on an AVX-512 host (2-core Intel KVM guest) one row
    of a 576x1536 layer came out with other bits than the same row among 2..300 (every other size
    and layer of the default model matched). Prompt rows must not depend on how the scheduler
    chunked the prompt, so the int8 dtypes' fp32 prompt rows (PromptRowsDense) take this. A lone
    prompt row is rare (a 1-token chunk), and a forward's linears cost about the same for 1 and 3 rows
    there (oneDNN, 22.9 and 23.5 ms).
    """
    if x.shape[0] != 1:
        return onednn_linear(x, weight, bias)
    return onednn_linear(torch.cat([x, x]), weight, bias)[:1]


class PanelLinear:
    """fp32 linear through specd_kernels/f32_matmul (weights packed by f32_matmul.pack), RMSNorm and the
    residual add in the same C call: torch's rms_norm alone took ~40 us a call, 61 calls a step
    (~2.4 ms of a ~30 ms batch-1 step, 2-core Intel guest)."""

    def __init__(self, lib):
        self.lib = lib

    def __call__(self, x, weight: f32_matmul.PackedF32, bias, norm=None, residual=None):
        if bias is not None:  # the bias goes in before the residual add, as the unfused path adds it
            y = f32_matmul.f32_matmul(self.lib, x, weight, norm=norm).add_(bias)
            return y if residual is None else residual.add_(y)
        return f32_matmul.f32_matmul(self.lib, x, weight, out=residual, norm=norm, accumulate=residual is not None)


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight)


BF16_CALL_ROWS = (64, 192)
"""Fewest and most rows per oneDNN bf16 call. On an AMX host (2-core Intel KVM guest) a row's bf16 bits
depended on how many rows the call had: 1-47, 256, 300 and 512 rows each gave some layer of the default
model other bits than a call of 64, every size from 64 to 192 the same bits (onednn_rows_exact checks
each size at load), and never on a row's place in the call or on the other rows. Bigger calls read
each weight fewer times: 256 rows of the model's linears took 37 ms as two calls of 128, 50 ms as four
of 64 (raw oneDNN calls, 30 layers of weights)."""


def bf16_call_rows(rows: int) -> list[int]:
    """How onednn_bf16_blocks splits `rows` into calls: as few as fit BF16_CALL_ROWS[1], of near-equal
    sizes (each >= 64 once rows >= 64: two calls of 96 or more), the last call padded up to 64."""
    fewest, most = BF16_CALL_ROWS
    calls = max(1, -(-rows // most))
    sizes = [rows // calls + (i < rows % calls) for i in range(calls)]
    return [max(size, fewest) for size in sizes]


def pack_onednn_bf16(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16))


def onednn_bf16_blocks(x, weight, bias, norm=None, residual=None):
    """fp32 rows -> bf16 (AMX) linear over weight packed by pack_onednn_bf16 -> fp32 rows, in calls of
    64 to 192 rows (bf16_call_rows; zero rows pad a short prompt chunk up to 64), so a row's bits never
    depend on how many rows came with it. norm=(weight, eps): RMSNorm straight into the bf16 rows
    (specd_kernels/bf16_rows); residual (without bias): each call's bf16 output added into it, cast in the
    add, so no fp32 copy of the output is made (the same bits as adding that copy). Written call by
    call: no concatenation, and no fresh zeroed buffer (each extra allocation and small parallel op
    cost tens of microseconds in a serving step)."""
    rows, calls = x.shape[0], bf16_call_rows(x.shape[0])
    padded = _bf16_rows(x, calls[0], norm)
    out, start = None, 0
    for size in calls:
        y = _LINEAR_POINTWISE(padded[start : start + size], weight, None, "none", [], "")
        stop = min(start + size, rows)
        if residual is not None and bias is None:
            residual[start:stop].add_(y[: stop - start])
        else:
            if out is None:
                out = torch.empty(rows, y.shape[1], dtype=torch.float32)
            out[start:stop] = y[: stop - start]
        start = stop
    if out is None:
        return residual
    if bias is not None:
        out.add_(bias)
    return out if residual is None else residual.add_(out)


def onednn_bf16_mlp(x, gate_up, down, norm, residual):
    """residual += down(SwiGLU(gate_up(RMSNorm(x)))) for prompt rows, in bf16 calls of 64-192 rows, each
    call's gate/up output going through SwiGLU (specd_kernels/bf16_rows) into down's input without an fp32
    copy (with RMSNorm into bf16: a 256-token prompt step ~89 ms against ~100, 2-core Intel guest)."""
    rows, calls = x.shape[0], bf16_call_rows(x.shape[0])
    padded = _bf16_rows(x, calls[0], norm)
    lib, start = bf16_rows.load(), 0
    for size in calls:
        y = _LINEAR_POINTWISE(padded[start : start + size], gate_up, None, "none", [], "")
        act = _swiglu_bf16(lib, y)
        z = _LINEAR_POINTWISE(act, down, None, "none", [], "")
        stop = min(start + size, rows)
        residual[start:stop].add_(z[: stop - start])
        start = stop
    return residual


def _bf16_rows(x: torch.Tensor, min_rows: int, norm) -> torch.Tensor:
    """x (RMS-normalised first when norm is given) as bf16 rows, zero rows padding it to min_rows."""
    rows = x.shape[0]
    padded = torch.empty(max(rows, min_rows), x.shape[1], dtype=torch.bfloat16)
    lib = bf16_rows.load() if norm is not None else None
    if lib is not None:
        bf16_rows.rms_norm_bf16(lib, x.contiguous(), norm[0], norm[1], padded[:rows])
    else:
        padded[:rows] = x if norm is None else F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])
    padded[rows:] = 0
    return padded


def _swiglu_bf16(lib, y: torch.Tensor) -> torch.Tensor:
    inter = y.shape[1] // 2
    if lib is not None:
        return bf16_rows.swiglu_bf16(lib, y, torch.empty(y.shape[0], inter, dtype=torch.bfloat16))
    return (F.silu(y[:, :inter].float()) * y[:, inter:].float()).to(torch.bfloat16)  # no compiler: torch


class FusedLinear:
    """A plain matmul behind the common signature, so the decoder layer is written once. fuses: the
    matmul takes norm= and residual= itself."""

    def __init__(self, matmul, fuses: bool = False):
        self.matmul, self.fuses = matmul, fuses

    def __call__(self, x, weight, bias, norm=None, residual=None):
        if self.fuses:
            return self.matmul(x, weight, bias, norm=norm, residual=residual)
        if norm is not None:
            x = F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])
        y = self.matmul(x, weight, bias)
        return y if residual is None else residual.add_(y)


FP32_BACKENDS = ("dense", "onednn", "f32_matmul")


def fp32_backend(name: str):
    """(pack, linear with the common signature) of an fp32 backend; RuntimeError where it cannot run here."""
    if name == "dense":
        return (lambda w: w), FusedLinear(dense_linear)
    if name == "onednn":
        return pack_onednn, FusedLinear(onednn_linear)
    lib = f32_matmul.load()
    if lib is None:
        raise RuntimeError("specd_kernels/f32_matmul needs a C compiler and a CPU with AVX2 + FMA")
    return f32_matmul.pack, FusedLinear(PanelLinear(lib), fuses=True)


def measure_backends(weights: list[torch.Tensor], reps: int = 5) -> str:
    """The fastest fp32 backend on some layers' weights (more than the cache holds), for 1 and 8 rows
    (a decode step and a verify step); another backend must beat F.linear by 5% and match it."""
    gen = torch.Generator().manual_seed(0)
    inputs = {m: {w.shape[1]: torch.randn(m, w.shape[1], generator=gen) for w in weights} for m in (1, 8)}
    ref = F.linear(inputs[8][weights[0].shape[1]], weights[0])
    candidates = {}
    for name in FP32_BACKENDS:
        try:
            pack, matmul = fp32_backend(name)
            packed = [pack(w) for w in weights]
            err = (matmul(inputs[8][weights[0].shape[1]], packed[0], None) - ref).abs().max() / ref.abs().max()
        except RuntimeError as e:  # an oneDNN build without the packed-linear op; no compiler or AVX2
            log.info("linear backend %s unavailable (%s)", name, e)
            continue
        if err < 1e-5:
            candidates[name] = (matmul, packed)

    def run(matmul, packed, m):
        t = time.perf_counter()
        for w, p in zip(weights, packed):
            matmul(inputs[m][w.shape[1]], p, None)
        return time.perf_counter() - t

    best = {(name, m): float("inf") for name in candidates for m in (1, 8)}
    for _ in range(reps):  # interleaved, best of reps per shape: robust to a noisy neighbour
        for m in (1, 8):
            for name, (matmul, packed) in candidates.items():
                best[name, m] = min(best[name, m], run(matmul, packed, m))
    total = {name: best[name, 1] + best[name, 8] for name in candidates}
    choice = min(total, key=lambda name: total[name] / (1.0 if name == "dense" else 0.95))
    log.info("linear backend %s (rows 1 + 8: %s)", choice,
             ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in total.items()))
    return choice


class PromptLinear(NamedTuple):
    """A dense linear for the int8 dtypes' prompt rows: how to pack a weight, and the matmul."""
    name: str
    pack: object  # weight -> packed weight
    matmul: object  # (x, packed weight, bias) -> y; with fuses, also norm= and residual= (FusedLinear)
    fuses: bool = False
    mlp: object = None  # (x, gate_up, down, norm, residual) -> residual, the SwiGLU block fused; None: per linear


PROMPT_FP32 = PromptLinear("oneDNN fp32", pack_onednn, onednn_linear_two_rows)
PROMPT_BF16 = PromptLinear("oneDNN bf16 blocks", pack_onednn_bf16, onednn_bf16_blocks, True, onednn_bf16_mlp)


def onednn_rows_exact(weights: list[torch.Tensor], prompt_linear: PromptLinear = PROMPT_FP32) -> bool:
    """Whether prompt_linear gives every row the same bits alone and in batches of several sizes, for
    these weights (fp32 did on the AMD dev CPU and on an Intel AVX-512 guest, bf16 blocks on the
    latter; a build or CPU where neither does keeps int8 prompt rows on the int8 path, which is exact
    by construction)."""
    gen = torch.Generator().manual_seed(0)
    try:
        for weight in weights:
            packed = prompt_linear.pack(weight)
            x = torch.randn(300, weight.shape[1], generator=gen)  # up to a long prompt chunk
            whole = prompt_linear.matmul(x, packed, None)
            for rows in range(BF16_CALL_ROWS[0], BF16_CALL_ROWS[1] + 1):  # every bf16 call size
                if not torch.equal(prompt_linear.matmul(x[:rows], packed, None), whole[:rows]):
                    return False
            for size in (1, 2, 3, 5, 8, 16, 33, 64, 100, 256):
                parts = torch.cat([prompt_linear.matmul(x[i : i + size], packed, None) for i in range(0, 300, size)])
                if not torch.equal(parts, whole):
                    return False
    except RuntimeError as e:  # a torch without oneDNN's packed linear, or without its bf16 kernels
        log.info("%s linear unavailable (%s)", prompt_linear.name, e)
        return False
    return True


def choose_prompt_linear(weights: list[torch.Tensor], reps: int = 3) -> PromptLinear | None:
    """The fastest row-exact dense linear for prompt rows on this machine, timed on a 256-row chunk
    (a long prompt's), or None when none is row-exact. bf16 only where oneDNN has native bf16
    (AMX or AVX-512 BF16): it emulates it elsewhere. Timed first, so only the fastest needs the
    exactness check (~1 s each) when it passes."""
    candidates = [PROMPT_FP32] + ([PROMPT_BF16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    gen = torch.Generator().manual_seed(0)
    inputs = {w.shape[1]: torch.randn(256, w.shape[1], generator=gen) for w in weights}
    best = {}
    for p in candidates:
        try:
            packed = [p.pack(w) for w in weights]
        except RuntimeError as e:  # a torch without oneDNN's packed linear, or without its bf16 kernels
            log.info("%s linear unavailable (%s)", p.name, e)
            continue
        best[p] = float("inf")
        for _ in range(reps):  # best of reps: robust to a noisy neighbour
            start = time.perf_counter()
            for w in packed:
                p.matmul(inputs[w.shape[1]], w, None)
            best[p] = min(best[p], time.perf_counter() - start)
    for choice in sorted(best, key=best.get):
        if onednn_rows_exact(weights, choice):
            log.info("int8 prompt rows: %s (256 rows: %s)", choice.name,
                     ", ".join(f"{p.name} {t * 1e3:.2f} ms" for p, t in best.items()))
            return choice
    return None


class HybridWeight(NamedTuple):
    dense: torch.Tensor  # packed by the model's PromptLinear
    int8: Int8Weight


class PromptRowsDense:
    """int8 dtypes: prompt-token rows through a dense oneDNN linear (a PromptLinear: fp32, or bf16
    blocks where measured faster), every other row through int8.

    Why: without VNNI, fbgemm's int8 is compute-bound once many rows go in, and split weights times two
    activation passes are 4x its work: at 256 rows one layer's qkv, gate_up and down took 39 ms
    against 16 ms in fp32 on the dev CPU, and a 256-token prompt chunk of the model 1.3 s against
    0.65. Decoding and verification rows stay int8, where reading the weights is the cost. A row's
    path depends only on whether its token is a prompt token, never on the step's shape, and both
    paths give a row the same bits alone or batched (oneDNN checked at load: onednn_rows_exact), so
    greedy output under every drafter stays token-identical to `--spec none`. A preempted request's
    recomputed output tokens stay int8.
    """

    def __init__(self, prompt_linear: PromptLinear = PROMPT_FP32):
        self.int8 = RowScaledInt8Linear()
        self.dense = FusedLinear(prompt_linear.matmul, prompt_linear.fuses)
        self.dense_mlp = prompt_linear.mlp
        self._route: tuple[torch.Tensor, torch.Tensor] | str = "int8"

    def set_rows(self, prompt_rows: torch.Tensor | None) -> None:
        """prompt_rows # [num_tokens] bool (None: none) routes the next forward's rows."""
        if prompt_rows is None or not bool(prompt_rows.any()):
            self._route = "int8"
        elif bool(prompt_rows.all()):
            self._route = "dense"
        else:
            self._route = (prompt_rows.nonzero().squeeze(1), (~prompt_rows).nonzero().squeeze(1))

    def __call__(self, x, weight: HybridWeight, bias, norm=None, residual=None):
        if self._route == "int8":
            return self.int8(x, weight.int8, bias, norm, residual)
        if self._route == "dense":
            return self.dense(x, weight.dense, bias, norm, residual)
        parts = []
        for rows, linear, w in ((self._route[0], self.dense, weight.dense), (self._route[1], self.int8, weight.int8)):
            part_residual = None if residual is None else residual.index_select(0, rows)
            parts.append((rows, linear(x.index_select(0, rows), w, bias, norm, part_residual)))
        out = residual if residual is not None else torch.empty(x.shape[0], parts[0][1].shape[1], dtype=x.dtype)
        for rows, y in parts:
            out.index_copy_(0, rows, y)
        return out

    def mlp(self, x, gate_up: HybridWeight, down: HybridWeight, norm, inter: int) -> torch.Tensor:
        """The SwiGLU block, x updated in place: prompt rows through the prompt linear's fused block
        where it has one, every row the same way whether the step's rows are all prompt or mixed."""
        if self.dense_mlp is None or self._route == "int8":
            return swiglu_block(self, x, gate_up, down, norm, inter)
        if self._route == "dense":
            return self.dense_mlp(x, gate_up.dense, down.dense, norm, x)
        prompt, other = self._route
        prompt_x, other_x = x.index_select(0, prompt), x.index_select(0, other)
        self.dense_mlp(prompt_x, gate_up.dense, down.dense, norm, prompt_x)
        swiglu_block(self.int8, other_x, gate_up.int8, down.int8, norm, inter)
        return x.index_copy_(0, prompt, prompt_x).index_copy_(0, other, other_x)


def swiglu_block(linear, x, gate_up, down, norm, inter: int) -> torch.Tensor:
    """x += down(silu(gate) * up) with gate/up = gate_up(RMSNorm(x)), through `linear` (the common
    signature), x updated in place."""
    gate_up_y = linear(x, gate_up, None, norm=norm)
    return linear(F.silu(gate_up_y[:, :inter]).mul_(gate_up_y[:, inter:]), down, None, residual=x)
