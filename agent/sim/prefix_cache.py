"""The SIMULATED engine's prefix cache: an LRU of prompt blocks, counted the way vLLM 0.32 counts
its automatic prefix caching (pure data, no I/O, no clock).

As in vLLM (vllm/v1/core/kv_cache_utils.py, single_type_kv_cache_manager.py, kv_cache_manager.py):
- a sequence of token IDs is cut into blocks of `block_size` tokens; only full blocks are cached;
- a block is identified by a hash chained over every token up to and including it (the parent
  block's hash and the block's own tokens), so block k is a hit only when the whole prefix before
  it matches too;
- a lookup walks the blocks from the start and stops at the first miss, and never counts the last
  prompt token as cached (vLLM recomputes it to get logits): at most (n - 1) // block_size blocks of
  an n-token prompt hit, so a block-aligned prompt seen before hits all its blocks but the last;
- `queries` grows by the prompt's tokens and `hits` by the cached tokens, once per request, when it
  is admitted to run (vLLM's PrefixCacheStats, exported as vllm:prefix_cache_queries_total and
  vllm:prefix_cache_hits_total); with the cache off (0 blocks) nothing is counted, as vLLM does
  without prefix caching.

Eviction is least recently used, whole blocks at a time. A sequence's blocks are touched tail first,
so its first block is the most recently used: at capacity the ends of long prefixes go before their
beginnings (vLLM frees a finished request's blocks in reverse order for the same reason), and a
shared system prompt outlives the conversations behind it.

Unlike vLLM's block pool, the cache is not shared with the requests running (the simulated KV usage
gauge is computed apart): blocks in use can be evicted here, which only costs a later miss.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_BLOCK_SIZE = 16  # vLLM's default --block-size
DEFAULT_CAPACITY_BLOCKS = 1024  # 16,384 tokens at the default block size: the simulated KV capacity
_ROOT = b"sim-prefix-cache-root"


@dataclass(frozen=True)
class Lookup:
    """What one admitted request found: `cached_tokens` of its `prompt_tokens` need no prefill."""

    prompt_tokens: int
    cached_tokens: int
    block_hashes: tuple[bytes, ...] = ()  # of the prompt's full blocks, to extend instead of redo

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class PrefixCache:
    def __init__(self, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"prefix cache capacity must be 0 (off) or more blocks, got {capacity_blocks}")
        if block_size < 1:
            raise ValueError(f"block size must be at least 1 token, got {block_size}")
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.queries = 0  # prompt tokens looked up (vLLM: vllm:prefix_cache_queries)
        self.hits = 0  # of those, tokens found cached (vLLM: vllm:prefix_cache_hits)
        self.evicted_blocks = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def cached_blocks(self) -> int:
        return len(self._blocks)

    def block_hashes(self, token_ids: Sequence[int], known: Sequence[bytes] = ()) -> list[bytes]:
        """The chained hash of every full block of `token_ids`, in order; `known` are the hashes of
        its first blocks, already computed (only the blocks after them are hashed)."""
        size = self.block_size
        out = list(known)
        parent = out[-1] if out else _ROOT
        for start in range(len(out) * size, len(token_ids) - size + 1, size):
            block = token_ids[start : start + size]
            parent = hashlib.blake2b(parent + struct.pack(f"<{size}I", *block), digest_size=16).digest()
            out.append(parent)
        return out

    def lookup(self, token_ids: Sequence[int]) -> Lookup:
        """Look up a prompt being admitted: count it (queries, hits) and mark its hits recently used."""
        n = len(token_ids)
        if not self.enabled:
            return Lookup(n, 0)
        hashes = self.block_hashes(token_ids)
        hit: list[bytes] = []
        for block_hash in hashes[: max(0, n - 1) // self.block_size]:
            if block_hash not in self._blocks:
                break
            hit.append(block_hash)
        self._touch(hit)
        cached = len(hit) * self.block_size
        self.queries += n
        self.hits += cached
        return Lookup(n, cached, tuple(hashes))

    def insert(self, token_ids: Sequence[int], known: Sequence[bytes] = ()) -> None:
        """Cache the full blocks of `token_ids` (tokens whose KV has been computed), evicting the least
        recently used blocks beyond the capacity. `known`: the hashes of its first blocks."""
        if self.enabled:
            self._touch(self.block_hashes(token_ids, known))

    def _touch(self, hashes: list[bytes]) -> None:
        for block_hash in reversed(hashes):  # tail first: the first block ends up most recent
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
            self.evicted_blocks += 1

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "block_size": self.block_size,
            "capacity_blocks": self.capacity_blocks,
            "cached_blocks": self.cached_blocks,
            "evicted_blocks": self.evicted_blocks,
            "queries": self.queries,
            "hits": self.hits,
        }
