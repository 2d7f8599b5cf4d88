"""The waiting queue across tenants, ordered by S-LoRA's Virtual Token Counter (VTC).

Owns: the order in which waiting requests are offered for admission, and one counter per tenant:
the weighted service it has received (Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024). It must not allocate KV blocks, touch LoRA slots or run the model: the scheduler
decides what fits and admits it, and reports the service it gives with `charge`.

    counter[tenant] = (input_cost * prompt tokens computed + output_cost * tokens generated) / weight[tenant]

The rules:

- Least served first. `in_order()` lists the tenants by increasing counter (ties: whose head
  request arrived first), each tenant's requests first-in, first-out, one tenant's whole queue
  before the next tenant's. That is exactly what repeatedly taking the head of the least-served
  tenant gives while nothing is charged: its counter stays the lowest until its queue is empty.
  Once `charge` has run, the order is stale; read it again (once a step is enough).
- No banked credit. A tenant that becomes backlogged (it had no waiting request and now has one)
  has its counter lifted to the lowest counter of the tenants backlogged at that moment; when no
  tenant is backlogged, to the counter of the tenant that left the queue last (the paper's rule
  for an empty queue). A larger counter of its own is kept. So a tenant that was idle, or that sent
  less than its share while the server had room, cannot later make up for it by shutting the
  others out.
- Preemption. `appendleft` puts a preempted request back at the head of its tenant's queue without
  a lift (its tenant's service so far stays charged); for ties it counts as the earliest arrival.

A request is known by identity, as the engine's `Request` (a dataclass with `eq=False`) is; it
needs a `tenant` and a `request_id` and is otherwise opaque. Memory: one float per tenant ever
seen, kept for good. Forgetting an idle tenant's counter could only lower it (a returning tenant
would start again from the lift), which is credit; tenants come from the API keys file (or are the
one default tenant of an open server), so the counters are bounded by the number of tenants. Every
call costs O(tenants) or less, besides `in_order()` and iteration, which list every waiting request.
"""

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

from loraplex.tenancy import DEFAULT_WEIGHT


class Queued(Protocol):
    """What the queue reads of a request."""

    tenant: str
    request_id: str


RequestT = TypeVar("RequestT", bound=Queued)


class FairQueue(Generic[RequestT]):
    """Waiting requests, per tenant FIFO, offered least-served tenant first.

    Args:
        weights: each tenant's weight (its share of a busy server); tenants not in it weigh 1.
        input_cost: service per prompt token computed.
        output_cost: service per generated token.
        tenant_of: the tenant a request is queued under; a constant makes the queue first-come,
            first-served across tenants (`--scheduling fcfs`).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        input_cost: float = 1.0,
        output_cost: float = 2.0,
        tenant_of: Callable[[RequestT], str] = attrgetter("tenant"),
    ):
        self.tenant_of = tenant_of
        for name, cost in (("input_cost", input_cost), ("output_cost", output_cost)):
            if not (math.isfinite(cost) and cost >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {cost!r}")
        self._weights = dict(weights or {})
        for tenant, weight in self._weights.items():
            if isinstance(weight, bool) or not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"tenant {tenant!r}: weight must be a finite number > 0, got {weight!r}")
        self.input_cost = input_cost
        self.output_cost = output_cost
        self._counters: dict[str, float] = {}
        # Backlogged tenants only: tenant -> id(request) -> (arrival, request), head first.
        self._queues: dict[str, OrderedDict[int, tuple[int, RequestT]]] = {}
        self._last_left: str | None = None  # the tenant whose queue emptied last
        self._arrivals = itertools.count()  # tail arrivals count up ...
        self._returns = itertools.count(-1, -1)  # ... preempted returns count down, ahead of all
        self._size = 0

    def append(self, request: RequestT) -> None:
        """Queue `request` behind its tenant's other waiting requests.

        Args:
            request: a request not already waiting; lifts its tenant's counter if the tenant had
                no waiting request.
        """
        queue = self._enqueue(request, next(self._arrivals), lift=True)
        queue.move_to_end(id(request))

    def appendleft(self, request: RequestT) -> None:
        """Put a preempted `request` back first in its tenant's queue, without a lift.

        Args:
            request: a request not already waiting.
        """
        queue = self._enqueue(request, next(self._returns), lift=False)
        queue.move_to_end(id(request), last=False)

    def _enqueue(self, request: RequestT, arrival: int, lift: bool) -> OrderedDict[int, tuple[int, RequestT]]:
        tenant = self.tenant_of(request)
        queue = self._queues.get(tenant)
        if queue is not None and id(request) in queue:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        if queue is None:
            own = self._counters.get(tenant, 0.0)
            self._counters[tenant] = max(own, self._lift_floor()) if lift else own
            queue = self._queues[tenant] = OrderedDict()
        queue[id(request)] = (arrival, request)
        self._size += 1
        return queue

    def _lift_floor(self) -> float:
        """The least counter a newly backlogged tenant may have (the paper's lift)."""
        if self._queues:
            return min(self._counters[tenant] for tenant in self._queues)
        if self._last_left is not None:
            return self._counters[self._last_left]
        return 0.0

    def remove(self, request: RequestT) -> None:
        """Take `request` out of the queue (admitted or cancelled).

        Args:
            request: a waiting request; ValueError if it is not waiting.
        """
        tenant = self.tenant_of(request)
        queue = self._queues.get(tenant)
        if queue is None or queue.pop(id(request), None) is None:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        self._size -= 1
        if not queue:
            del self._queues[tenant]
            self._last_left = tenant

    def in_order(self) -> list[RequestT]:
        """Every waiting request, in the order admission should consider them now.

        Tenants by increasing counter (ties: whose head request arrived first), each tenant's whole
        queue in FIFO order before the next tenant's.
        """
        tenants = sorted(self._queues, key=lambda tenant: (self._counters[tenant], next(iter(self._queues[tenant].values()))[0]))
        return [request for tenant in tenants for _, request in self._queues[tenant].values()]

    def charge(self, tenant: str, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        """Add service to `tenant`'s counter, weighted by its weight.

        Args:
            tenant: the tenant served; need not be waiting (its requests may all be running).
            prompt_tokens: prompt tokens computed for it (prefill, or recomputed after preemption).
            generated_tokens: tokens generated for it.
        """
        if prompt_tokens < 0 or generated_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt_tokens} prompt and {generated_tokens} generated")
        service = prompt_tokens * self.input_cost + generated_tokens * self.output_cost
        self._counters[tenant] = self._counters.get(tenant, 0.0) + service / self._weight(tenant)

    def _weight(self, tenant: str) -> float:
        return self._weights.get(tenant, DEFAULT_WEIGHT)

    def counter(self, tenant: str) -> float:
        """`tenant`'s counter: its weighted service so far (0 for a tenant never seen).

        Args:
            tenant: any tenant.
        """
        return self._counters.get(tenant, 0.0)

    def counters(self) -> dict[str, float]:
        """Every tenant's counter, for metrics."""
        return dict(self._counters)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __contains__(self, request: object) -> bool:
        try:
            queue = self._queues.get(self.tenant_of(request))
        except AttributeError:
            return False
        return queue is not None and id(request) in queue

    def __iter__(self) -> Iterator[RequestT]:
        return iter(self.in_order())
