"""Automatic prefix caching: which KV blocks hold which token prefixes, and which may be reused.

Owns: `PrefixCache`, the table from a full block's key to the KV block holding its K/V, the
reference count of every cached block (how many running requests' block tables hold it), the
LRU of cached blocks that nobody references (handed back for reuse, least recently used first,
only when the allocator's free list is empty), and the hit-rate counters (in tokens, as vLLM's
`prefix_cache_queries` / `prefix_cache_hits`). `extend_keys` builds the keys: block i's key is
SHA-256 over block i - 1's key, the adapter version's identity (`LoraAdapter.uid`; the base
model, None, is a namespace of its own), the tenant's name when the cache is scoped to tenants
(the default: no tenant can tell from its time to first token that another sent a prefix) and
block i's token ids. A token's K/V depends on every token before it and on the adapter, so equal
keys mean equal K/V; a cryptographic hash, as vLLM's `sha256` option, so that no request can forge
another's key. Only full blocks have keys.

It must not: decide what a request computes (the scheduler does), hand out a block that anyone
references, or touch the cache tensors. Blocks that were never cached are the allocator's
(kv_cache.py).
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BASE_NAMESPACE = b"base"  # the base model's blocks: no adapter


def extend_keys(
    keys: list[bytes], token_ids: Sequence[int], block_size: int, namespace: str | None, tenant: str | None = None
) -> list[bytes]:
    """Append to `keys` the key of every full block of `token_ids` past the first `len(keys)`; returns `keys`.

    Args:
        keys: the keys of the sequence's first blocks, computed earlier (extended in place).
        token_ids: the whole sequence so far.
        block_size: tokens per block.
        namespace: the adapter version's uid; None for the base model.
        tenant: with the cache scoped to tenants, the request's tenant: its blocks are its own.
    """
    tag = BASE_NAMESPACE if namespace is None else b"lora:" + namespace.encode()
    if tenant is not None:
        owner = tenant.encode()
        tag = b"tenant:" + len(owner).to_bytes(4, "little") + owner + tag
    for index in range(len(keys), len(token_ids) // block_size):
        parent = keys[index - 1] if index else b""
        tokens = array("q", token_ids[index * block_size : (index + 1) * block_size]).tobytes()
        keys.append(hashlib.sha256(b"".join((parent, len(tag).to_bytes(4, "little"), tag, tokens))).digest())
    return keys


class PrefixCache:
    """Cached KV blocks by key, with reference counts and an LRU of the unreferenced ones."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}  # key -> the block holding it
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._refs: dict[int, int] = {}  # block cached while held -> block tables holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first
        self.queries = 0  # tokens of the requests looked up
        self.hits = 0  # of those, tokens found cached

    def __len__(self) -> int:
        return len(self._key_of)

    @property
    def num_idle(self) -> int:
        """Cached blocks nobody references: reusable, so the allocator counts them as free."""
        return len(self._idle)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of `keys`, from the first, that is cached; changes nothing."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def refcount(self, block: int) -> int:
        """Block tables holding `block`, counted while it is (or was, when they took it) cached; 0 otherwise."""
        return self._refs.get(block, 0)

    def num_idle_in(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` are idle (acquiring them takes that many from the free count)."""
        return sum(block in self._idle for block in blocks)

    def acquire(self, blocks: Iterable[int]) -> None:
        """One more block table holds each of `blocks` (cached blocks, from `lookup`)."""
        for block in blocks:
            if block not in self._key_of:
                raise ValueError(f"KV block {block} is not cached")
            self._refs[block] = self._refs.get(block, 0) + 1
            self._idle.pop(block, None)

    def insert(self, key: bytes, block: int) -> bool:
        """Cache `block`, held by the one request that wrote it, under `key`.

        Returns:
            False when `key` is cached already (in another block: this one stays private) or
            `block` already holds a key.
        """
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        self._refs[block] = 1
        return True

    def release(self, blocks: Sequence[int]) -> list[int]:
        """A block table holding `blocks` lets them go; returns those now free for the allocator.

        A cached block nobody holds any more joins the LRU instead: last blocks first, so that
        a sequence's tail is evicted before the prefix others are likelier to share.
        """
        freed = []
        for block in reversed(blocks):
            refs = self._refs.get(block)
            if refs is None:
                freed.append(block)
            elif refs > 1:
                self._refs[block] = refs - 1
            else:
                del self._refs[block]
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    freed.append(block)
        freed.reverse()
        return freed

    def evict(self, count: int) -> list[int]:
        """Take the `count` least recently used idle blocks out of the cache, for reuse."""
        if count > len(self._idle):
            raise ValueError(f"asked to evict {count} cached KV blocks with {len(self._idle)} idle")
        evicted = []
        for _ in range(count):
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            evicted.append(block)
        return evicted

    def forget(self, blocks: Iterable[int]) -> list[int]:
        """Uncache `blocks` (their K/V cannot be trusted); returns the idle ones, now free.

        Held ones stay held: each becomes free when its last holder releases it.
        """
        freed = []
        for block in blocks:
            key = self._key_of.pop(block, None)
            if key is not None:
                del self._block_of[key]
                if block in self._idle:
                    del self._idle[block]
                    freed.append(block)
        return freed

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one lookup of `queried_tokens` tokens, `hit_tokens` of them found cached."""
        self.queries += queried_tokens
        self.hits += hit_tokens
