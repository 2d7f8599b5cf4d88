"""Iteration-level scheduling: which requests run in the next step, and with how many tokens.

Owns: the waiting queue and the running set, the per-step token budget and sequence cap, KV-block
allocation (with recompute preemption when blocks run out), and the LoRA slot each running request
pins. Policy, in order, every step:

1. Running requests continue: one token for a decode, the next chunk for a prefill (chunked
   prefill). If KV blocks run out, the most recently admitted request is preempted: its blocks
   and slot are freed and it goes back to the head of the queue, to be recomputed later.
2. Waiting requests are admitted in the waiting queue's order (fair_queue.py: the least-served
   tenant first by S-LoRA's virtual token counter, first-come, first-served within a tenant; or
   first-come, first-served across tenants with `scheduling="fcfs"`) while the token budget, the
   sequence cap and the KV blocks allow. Every chunk scheduled is charged to its tenant: prompt
   tokens computed (recomputation included) and tokens generated. A request whose adapter is still being read from disk into host
   memory is passed over, without limit, until it is there. A request whose adapter cannot get a slot (every slot is pinned by
   running requests) waits. Later requests whose adapters are already resident may pass it, but
   only `max_slot_bypass` times; after that admission is strictly in order, so none starves.
3. With prefix caching (prefix_cache.py), a request admitted takes the longest run of its full
   blocks already cached for its adapter version, by its own tenant unless `prefix_cache_scope`
   is global (blocks finished or preempted requests left, or blocks a request scheduled
   earlier in this very step writes: every layer writes the step's
   K/V before it attends, so a sibling reads them exactly), keeping at least its last token to
   compute, since its next token needs that token's logits; a request asking for prompt logprobs
   looks nothing up, as every prompt token must be scored. Every full block a scheduled chunk
   completes is cached as it is scheduled. A preempted request recomputes through the cache.

It never runs the model and never touches text.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from loraplex.engine.fair_queue import FairQueue
from loraplex.engine.host_tier import HostTier
from loraplex.engine.kv_cache import KVCache
from loraplex.engine.prefix_cache import extend_keys
from loraplex.engine.request import FinishReason, Request, RequestStatus
from loraplex.engine.slots import SlotCache


@dataclass
class ScheduledSeq:
    """One request's share of a step: tokens [start, start + length) of `request.all_ids`."""

    request: Request
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a new token is sampled from it."""
        return self.start + self.length == self.request.num_tokens


@dataclass
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_slot_bypass: int
    fair: bool = True  # tenants by virtual token counter; False: first-come, first-served across tenants
    tenant_weights: Mapping[str, float] | None = None
    prefix_caching: bool = False  # reuse cached KV blocks of a prompt's prefix (prefix_cache.py)
    prefix_per_tenant: bool = True  # a cached prefix serves only its own tenant's requests


class Scheduler:
    """Decides each step's batch; the engine reports back which requests finished."""

    def __init__(self, limits: SchedulerLimits, kv_cache: KVCache, slots: SlotCache, host: HostTier):
        self.limits = limits
        self.kv_cache = kv_cache
        self.slots = slots
        self.host = host
        self.waiting: FairQueue[Request] = FairQueue(
            limits.tenant_weights, tenant_of=(lambda request: request.tenant) if limits.fair else (lambda request: "")
        )
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self.prefix_cache = kv_cache.allocator.prefix_cache
        self._block_keys: dict[Request, list[bytes]] = {}  # each request's full-block keys so far
        self._num_cached: dict[Request, int] = {}  # leading blocks of its table already cached

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        """The next step's batch, possibly empty when nothing can run."""
        budget = self.limits.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING or budget == 0:
                continue
            length = min(request.num_tokens - request.num_computed, budget)
            if not self._reserve_blocks(request, request.num_computed + length):
                continue  # this request itself was preempted
            self._append(batch, ScheduledSeq(request, request.num_computed, length))
            self._cache_blocks(request, request.num_computed + length)
            budget -= length
        budget -= self._admit(batch, budget)
        return batch

    def _append(self, batch: list[ScheduledSeq], seq: ScheduledSeq) -> None:
        """Add `seq` to the batch and charge its tenant: a decode generates one token, anything else is prompt work."""
        batch.append(seq)
        request = seq.request
        decode = seq.length == 1 and bool(request.output_ids) and seq.start == request.num_tokens - 1
        tenant = self.waiting.tenant_of(request)
        self.waiting.charge(tenant, prompt_tokens=0 if decode else seq.length, generated_tokens=1 if decode else 0)

    def _admit(self, batch: list[ScheduledSeq], budget: int) -> int:
        used = 0
        blocked: Request | None = None  # the first request waiting for a slot this step
        passed: set[int] = set()  # requests looked at and left waiting this step
        order, index = self.waiting.in_order(), 0
        while index < len(order) and len(self.running) < self.limits.max_num_seqs and budget - used > 0:
            request = order[index]
            index += 1
            if id(request) in passed:
                continue
            adapter = request.adapter
            if adapter is not None and not self.host.ready(adapter):
                passed.add(id(request))  # its adapter is still being read from disk: others go meanwhile
                continue
            if adapter is not None:
                if blocked is not None and (
                    blocked.slot_bypassed >= self.limits.max_slot_bypass or not self.slots.is_resident(adapter)
                ):
                    passed.add(id(request))
                    continue
                if not self.slots.can_acquire(adapter):
                    blocked = blocked or request
                    passed.add(id(request))
                    continue
            hits = self._cached_prefix(request)
            computed = len(hits) * self.kv_cache.block_size
            length = min(request.num_tokens - computed, budget - used)
            blocks = self.kv_cache.blocks_needed(computed + length) - len(hits)
            if blocks + self.prefix_cache.num_idle_in(hits) > self.kv_cache.allocator.num_free:
                break  # KV memory is first-come, first-served: nobody passes a request waiting for it
            if adapter is not None:
                request.slot = self.slots.acquire(adapter)
                if blocked is not None:
                    blocked.slot_bypassed += 1
            self.waiting.remove(request)
            self.prefix_cache.acquire(hits)  # first: allocating must not evict them
            request.block_table = hits + self.kv_cache.allocator.allocate(blocks)
            request.num_computed = computed
            self._num_cached[request] = len(hits)
            if self.limits.prefix_caching and request.prompt_logprobs is None:
                self.prefix_cache.record(request.num_tokens, computed)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._append(batch, ScheduledSeq(request, computed, length))
            self._cache_blocks(request, computed + length)
            used += length
            order, index = self.waiting.in_order(), 0  # the charge may have changed which tenant is least served
        return used

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks `request` can start from: whole blocks, its last token left to compute."""
        if not self.limits.prefix_caching or request.prompt_logprobs is not None:
            return []
        usable = (request.num_tokens - 1) // self.kv_cache.block_size
        return self.prefix_cache.lookup(self._keys(request)[:usable])

    def _cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Cache every full block among `request`'s first `num_tokens` (those scheduled so far)."""
        full = num_tokens // self.kv_cache.block_size
        done = self._num_cached.get(request, 0)
        if not self.limits.prefix_caching or full <= done:
            return
        keys = self._keys(request)
        for index in range(done, full):
            self.prefix_cache.insert(keys[index], request.block_table[index])
        self._num_cached[request] = full

    def _keys(self, request: Request) -> list[bytes]:
        """The keys of every full block of `request`'s tokens (extended as it generates)."""
        keys = self._block_keys.setdefault(request, [])
        if len(keys) < request.num_tokens // self.kv_cache.block_size:
            namespace = None if request.adapter is None else request.adapter.uid
            tenant = request.tenant if self.limits.prefix_per_tenant else None
            extend_keys(keys, request.all_ids, self.kv_cache.block_size, namespace, tenant)
        return keys

    def _reserve_blocks(self, request: Request, num_tokens: int) -> bool:
        """Grow `request`'s block table to hold `num_tokens`, preempting newer requests if needed.

        Returns:
            False when `request` itself had to be preempted.
        """
        needed = self.kv_cache.blocks_needed(num_tokens) - len(request.block_table)
        while needed > self.kv_cache.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        if needed > 0:
            request.block_table.extend(self.kv_cache.allocator.allocate(needed))
        return True

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _release(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.allocator.free(request.block_table)
        self._num_cached.pop(request, None)
        request.block_table = []
        if request.slot is not None:
            self.slots.release(request.adapter)
            request.slot = None

    def finish(self, request: Request) -> None:
        """Free a finished or cancelled request's KV blocks and slot reference at once.

        A failed request's blocks are uncached: the step that failed may have left them unwritten.
        """
        if request.status is RequestStatus.RUNNING:
            if request.finish_reason is FinishReason.ERROR:
                self.kv_cache.allocator.forget(request.block_table)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._block_keys.pop(request, None)
        request.status = RequestStatus.FINISHED
