"""Random ragged paged-attention batches for the kernel tests (fresh inputs per seed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specd_kernels.attention.ref import _slot_ids


def random_tree_mask(num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask [num_nodes, num_nodes] of a random tree whose parents come earlier."""
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for j in range(1, num_nodes):
        mask[j] |= mask[int(torch.randint(0, j, (1,), generator=gen))]
    return mask


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # [batch + 1] int32
    kv_lens: torch.Tensor  # [batch] int32
    block_tables: torch.Tensor  # [batch, max_blocks] int32, -1 past each request's blocks
    tree_mask: torch.Tensor | None
    cu_tree_mask: torch.Tensor | None
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.kv_lens, self.block_tables,
                self.scale, self.tree_mask, self.cu_tree_mask)

    def to_float(self) -> "PagedBatch":
        """The same batch in fp32 on the CPU (what the reference is run on)."""
        def cpu(t):
            return None if t is None else t.cpu()
        return PagedBatch(self.q.float().cpu(), self.k_cache.float().cpu(), self.v_cache.float().cpu(),
                          cpu(self.cu_seqlens_q), cpu(self.kv_lens), cpu(self.block_tables), cpu(self.tree_mask),
                          cpu(self.cu_tree_mask), self.scale)


def make_batch(q_lens, kv_lens, num_kv_heads, group, head_dim, tree_ids=(), block_size=16, seed=0,
               dtype=torch.float32, device="cpu") -> PagedBatch:
    """Requests' blocks scattered through a cache full of finite garbage; trees on `tree_ids`."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(q_lens)
    blocks_per_req = [math.ceil(n / block_size) for n in kv_lens]
    num_blocks = sum(blocks_per_req) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen) * 2
    v_cache = torch.randn(shape, generator=gen) * 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((batch, max(blocks_per_req + [1]) + 1), -1, dtype=torch.int32)
    for i, num in enumerate(blocks_per_req):
        block_tables[i, :num] = torch.tensor([perm.pop() for _ in range(num)], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    tree_mask = cu_tree = None
    if tree_ids:
        trees = {i: random_tree_mask(q_lens[i], gen) for i in tree_ids}
        sizes = [q_lens[i] ** 2 if i in trees else 0 for i in range(batch)]
        cu_tree = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int64)
        tree_mask = torch.cat([trees[i].reshape(-1) for i in sorted(trees)])

    def dev(t, float_dtype=None):
        return None if t is None else t.to(device=device, dtype=float_dtype or t.dtype)
    return PagedBatch(dev(q, dtype), dev(k_cache, dtype), dev(v_cache, dtype), dev(cu_q),
                      dev(torch.tensor(kv_lens, dtype=torch.int32)), dev(block_tables), dev(tree_mask),
                      dev(cu_tree), head_dim ** -0.5)


def random_hidden_keys(batch: PagedBatch, fraction: float, seed: int = 0) -> torch.Tensor:
    """[batch, max kv_len] bool: a random `fraction` of each request's context keys hidden."""
    gen = torch.Generator().manual_seed(seed)
    kv_lens, cu_q = batch.kv_lens.tolist(), batch.cu_seqlens_q.tolist()
    hidden = torch.zeros(len(kv_lens), max(kv_lens), dtype=torch.bool)
    for i, kv_len in enumerate(kv_lens):
        ctx = kv_len - (cu_q[i + 1] - cu_q[i])
        hidden[i, :ctx] = torch.rand(ctx, generator=gen) < fraction
    return hidden


def without_hidden_keys(batch: PagedBatch, hidden: torch.Tensor) -> PagedBatch:
    """The same queries over caches that hold only each request's visible keys, in order: what
    attention with `hidden` keys must equal."""
    block_size = batch.k_cache.shape[1]
    k_flat = batch.k_cache.reshape(-1, *batch.k_cache.shape[2:])
    v_flat = batch.v_cache.reshape(-1, *batch.v_cache.shape[2:])
    keys, values, lens, tables, num_blocks = [], [], [], [], 0
    for i, kv_len in enumerate(batch.kv_lens.tolist()):
        pos = torch.tensor([p for p in range(kv_len) if not hidden[i, p]], dtype=torch.long)
        slots = _slot_ids(batch.block_tables[i], kv_len, block_size)[pos]
        blocks = -(-len(pos) // block_size)
        pad = blocks * block_size - len(pos)
        keys.append(torch.cat([k_flat[slots], k_flat.new_zeros(pad, *k_flat.shape[1:])]))
        values.append(torch.cat([v_flat[slots], v_flat.new_zeros(pad, *v_flat.shape[1:])]))
        lens.append(len(pos))
        tables.append(list(range(num_blocks, num_blocks + blocks)))
        num_blocks += blocks
    width = max(len(t) for t in tables) + 1
    block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, *batch.k_cache.shape[2:])
    return PagedBatch(batch.q, torch.cat(keys).view(shape), torch.cat(values).view(shape), batch.cu_seqlens_q,
                      torch.tensor(lens, dtype=torch.int32), block_tables, batch.tree_mask, batch.cu_tree_mask,
                      batch.scale)
