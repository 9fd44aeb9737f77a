"""The paged KV cache's bookkeeping: a refcounted block pool with prefix caching by block hash and LRU eviction."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

# A block holds `block_size` consecutive tokens of one sequence. Full blocks are named by a chained
# hash of every token up to and including them, so two sequences with the same prefix name the same
# blocks and can share them (read-only). Refcounts track sharing; a block whose count drops to 0
# stays cached (LRU order) until its memory is needed:
#
#   free list  ->  allocate  ->  in use (refcount >= 1)  ->  release
#                                      ^                          |
#                  prefix hit: retain  |                          v
#                                 cached, evictable (refcount 0, LRU) --evict--> reused


def ring_blocks_needed(window: int | None, rows: int, block_size: int) -> int | None:
    """Blocks of a windowed layer's ring that never overwrite a key a query of the same call still needs
    (None: no window).

    A ring keeps a sequence's last blocks only: logical block i lives in ring entry i % ring_blocks. A kernel
    call writes its rows' keys, up to position p0 + rows - 1, before any query reads, and its first query p0
    reads back to p0 - window + 1: those window + rows - 1 positions span at most
    (window + rows - 2) // block_size + 2 blocks, which must all be distinct entries of the ring.
    """
    return None if not window else (window + rows - 2) // block_size + 2


def block_hashes(tokens: list[int], block_size: int) -> list[str]:
    """Chained hashes of the full blocks of `tokens` (a block's hash covers the whole prefix)."""
    out, parent = [], ""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = np.asarray(tokens[start:start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent.encode() + chunk, digest_size=16).hexdigest()
        out.append(parent)
    return out


@dataclass
class PoolStats:
    prefix_hit_tokens: int = 0  # prompt tokens whose prefill was skipped thanks to cached blocks
    evictions: int = 0


class BlockPool:
    """Physical block ids 0..num_blocks-1 with refcounts, a hash -> block cache and LRU eviction."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = np.zeros(num_blocks, dtype=np.int32)
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with refcount 0, oldest first
        self.hash_of: dict[int, str] = {}
        self.block_of: dict[str, int] = {}
        self.stats = PoolStats()

    def available(self) -> int:
        """Blocks an allocation can get now (free + evictable)."""
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int | None:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
            self.stats.evictions += 1
        else:
            return None
        self.refcount[block] = 1
        return block

    def retain(self, block: int) -> None:
        if self.refcount[block] == 0:
            self.evictable.pop(block, None)
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] < 0:
            raise RuntimeError(f"block {block} released more often than retained")
        if self.refcount[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def publish(self, block: int, digest: str) -> None:
        """Make a full block findable by its prefix hash (first writer wins)."""
        if digest not in self.block_of and block not in self.hash_of:
            self.block_of[digest] = block
            self.hash_of[block] = digest

    def lookup(self, digest: str) -> int | None:
        return self.block_of.get(digest)


@dataclass
class SequenceBlocks:
    """One sequence's block table and how many of its leading blocks are published."""

    table: list[int] = field(default_factory=list)
    published: int = 0


class KVCacheManager:
    """Block tables for sequences on top of a BlockPool."""

    def __init__(self, pool: BlockPool, max_blocks: int) -> None:
        self.pool, self.max_blocks = pool, max_blocks

    def match_prefix(self, seq: SequenceBlocks, tokens: list[int]) -> int:
        """Attach cached blocks for the longest cached prefix of tokens[:-1]; returns tokens covered.

        The last token is never matched: its logits are needed, so at least one token is computed.
        """
        covered = 0
        for digest in block_hashes(tokens[:-1], self.pool.block_size):
            block = self.pool.lookup(digest)
            if block is None:
                break
            self.pool.retain(block)
            seq.table.append(block)
            covered += self.pool.block_size
        seq.published = len(seq.table)
        self.pool.stats.prefix_hit_tokens += covered
        return covered

    def ensure(self, seq: SequenceBlocks, n_tokens: int) -> bool:
        """Grow the table to hold n_tokens; False (and nothing allocated) when the pool is short."""
        need = -(-n_tokens // self.pool.block_size) - len(seq.table)
        if need <= 0:
            return True
        if need > self.pool.available() or len(seq.table) + need > self.max_blocks:
            return False
        seq.table.extend(self.pool.allocate() for _ in range(need))
        return True

    def publish_full_blocks(self, seq: SequenceBlocks, tokens: list[int], computed: int) -> None:
        """Publish blocks whose tokens are all computed (their KV is in the pool)."""
        full = computed // self.pool.block_size
        if full > seq.published:
            digests = block_hashes(tokens[:full * self.pool.block_size], self.pool.block_size)
            for index in range(seq.published, full):
                self.pool.publish(seq.table[index], digests[index])
            seq.published = full

    def free(self, seq: SequenceBlocks) -> None:
        for block in seq.table:
            self.pool.release(block)
        seq.table.clear()
        seq.published = 0
