"""Paged KV cache bookkeeping: a pool of fixed-size blocks and per-request block tables.

The block-table idea is PagedAttention's (Kwon et al., "Efficient Memory Management for Large
Language Model Serving with PagedAttention", 2023). This module only does the arithmetic: which
request owns which block and which physical slot a token position maps to. The tensors that hold
K/V live in the model runner; this file is pure Python and never imports torch.

A request's block table is `Request.block_ids`; slot `s` of the cache holds position
`p` of request `r` where `s = r.block_ids[p // block_size] * block_size + p % block_size`.
EMS-SD's unpadded KV cache falls out of this: every request has its own length, and rejected drafts
are dropped with `rollback` (their slots are simply overwritten later).
"""
from __future__ import annotations

from engine.types import Request


class KVCacheError(RuntimeError):
    """A broken invariant of the block pool (double free, foreign block); always a bug."""


class KVCacheManager:
    """Hands out KV blocks to requests; O(1) per block allocated or freed."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("kv cache needs at least one block of at least one slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: freed blocks are reused first (still warm in GPU L2); reversed so a fresh pool
        # hands out 0, 1, 2, ... which keeps tests and traces readable.
        self._free_block_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        # Owner per block (None = free) turns double frees and cross-request frees into errors
        # instead of two requests silently sharing a block.
        self._owner_ids: list[str | None] = [None] * num_blocks

    # ------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0 (the kv_cache_usage gauge)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that cover `num_tokens` slots."""
        return -(-max(num_tokens, 0) // self.block_size)

    def num_slots(self, request: Request) -> int:
        """Token slots the request's blocks cover."""
        return len(request.block_ids) * self.block_size

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(request.block_ids) <= self.num_free_blocks

    def slot(self, request: Request, position: int) -> int:
        """The physical cache slot of token `position` of `request`."""
        if not 0 <= position < self.num_slots(request):
            raise IndexError(f"position {position} outside the {self.num_slots(request)} slots "
                             f"of request {request.request_id}")
        block_id = request.block_ids[position // self.block_size]
        return block_id * self.block_size + position % self.block_size

    # ------------------------------------------------------------ changes

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow `request.block_ids` to cover `num_tokens` slots; all or nothing.

        Returns False, changing nothing, when the pool lacks the blocks. Never shrinks.
        """
        num_new_blocks = self.blocks_needed(num_tokens) - len(request.block_ids)
        if num_new_blocks <= 0:
            return True
        if num_new_blocks > len(self._free_block_ids):
            return False
        for _ in range(num_new_blocks):
            block_id = self._free_block_ids.pop()
            self._owner_ids[block_id] = request.request_id
            request.block_ids.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Return all of the request's blocks to the pool."""
        self._release(request, request.block_ids)
        request.block_ids = []

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Keep only the blocks covering the first `num_tokens` slots; free the rest.

        Slots past `num_tokens` inside the last kept block stay allocated and are overwritten
        later, so rejected drafts cost nothing more than this.
        """
        num_keep = self.blocks_needed(num_tokens)
        self._release(request, request.block_ids[num_keep:])
        del request.block_ids[num_keep:]

    def _release(self, request: Request, block_ids: list[int]) -> None:
        # Validate everything first so a bad call leaves the pool untouched.
        seen: set[int] = set()
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise KVCacheError(f"block {block_id} is not in the pool")
            owner_id = self._owner_ids[block_id]
            if owner_id is None or block_id in seen:
                raise KVCacheError(f"double free of block {block_id} by {request.request_id}")
            if owner_id != request.request_id:
                raise KVCacheError(f"request {request.request_id} frees block {block_id} "
                                   f"owned by {owner_id}")
            seen.add(block_id)
        # Pushed last-first so the next allocation pops them in their old order: a request that
        # reuses them gets consecutive blocks, which attention reads as a view instead of a gather.
        for block_id in reversed(block_ids):
            self._owner_ids[block_id] = None
            self._free_block_ids.append(block_id)

    def check_invariants(self, requests: list[Request]) -> None:
        """Raise if the pool and the given block tables disagree (for tests and debugging)."""
        owned = [b for r in requests for b in r.block_ids]
        if len(owned) != len(set(owned)):
            raise KVCacheError("a block is in two block tables")
        if len(set(self._free_block_ids)) != len(self._free_block_ids):
            raise KVCacheError("a block is twice in the free list")
        if set(owned) & set(self._free_block_ids):
            raise KVCacheError("a block is both owned and free")
        if len(owned) + self.num_free_blocks != self.num_blocks:
            raise KVCacheError(f"{len(owned)} owned + {self.num_free_blocks} free "
                               f"!= {self.num_blocks} blocks (leak)")
        for r in requests:
            for block_id in r.block_ids:
                if self._owner_ids[block_id] != r.request_id:
                    raise KVCacheError(f"block {block_id} owner mismatch")
