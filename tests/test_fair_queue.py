"""FairQueue: the waiting queue ordered by S-LoRA's Virtual Token Counter.

Requests are a tiny fake (a tenant and an id); simulated runs admit the head of `in_order()`,
charge its tokens, and check who was served, with a bounded number of picks.
"""

import math
from dataclasses import dataclass

import pytest

from loraplex.engine.fair_queue import FairQueue


@dataclass(eq=False)
class Req:
    tenant: str
    request_id: str
    prompt_tokens: int = 10
    output_tokens: int = 20


def reqs(*names: str) -> list[Req]:
    """Requests named "<tenant><n>", e.g. "a1" for tenant "a"."""
    return [Req(name[0], name) for name in names]


def ids(queue: FairQueue) -> list[str]:
    return [request.request_id for request in queue.in_order()]


def admit_head(queue: FairQueue, served: dict[str, int]) -> Req:
    """Admit the head of the order, charge its tokens, and add its service to `served`."""
    head = queue.in_order()[0]
    queue.remove(head)
    queue.charge(head.tenant, head.prompt_tokens, head.output_tokens)
    served[head.tenant] = served.get(head.tenant, 0) + head.prompt_tokens * queue.input_cost + head.output_tokens * queue.output_cost
    return head


# ----- order ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "appended, expected",
    [
        (["a1", "a2", "a3"], ["a1", "a2", "a3"]),
        (["a1", "b1", "a2", "b2"], ["a1", "a2", "b1", "b2"]),
        (["b1", "a1", "a2", "b2"], ["b1", "b2", "a1", "a2"]),
    ],
    ids=["one-tenant", "a-first", "b-first"],
)
def test_each_tenant_is_fifo_and_equal_counters_go_by_head_arrival(appended, expected):
    queue = FairQueue()
    for request in reqs(*appended):
        queue.append(request)
    assert ids(queue) == expected


@pytest.mark.parametrize(
    "charges, expected",
    [
        ({"a": (5, 0)}, ["b1", "b2", "c1", "a1", "a2"]),
        ({"a": (0, 3), "b": (5, 0)}, ["c1", "b1", "b2", "a1", "a2"]),
        ({"a": (1, 0), "b": (1, 0), "c": (1, 0)}, ["a1", "a2", "b1", "b2", "c1"]),
    ],
    ids=["a-served", "a-most-served", "all-equal"],
)
def test_the_least_served_tenant_comes_first(charges, expected):
    queue = FairQueue()
    for request in reqs("a1", "b1", "c1", "a2", "b2"):
        queue.append(request)
    for tenant, (prompt, generated) in charges.items():
        queue.charge(tenant, prompt, generated)
    assert ids(queue) == expected


def test_a_charge_counts_prompt_and_generated_tokens_at_their_costs_over_the_weight():
    queue = FairQueue({"a": 4.0}, input_cost=1.0, output_cost=3.0)
    queue.charge("a", prompt_tokens=8, generated_tokens=4)
    queue.charge("b", prompt_tokens=8)
    assert queue.counter("a") == pytest.approx((8 + 4 * 3) / 4)
    assert queue.counters() == {"a": pytest.approx(5.0), "b": pytest.approx(8.0)}
    assert queue.counter("never-seen") == 0.0


# ----- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"a": 2.0}, {"a": 1.0, "b": 3.0}, {"a": 5.0, "b": 0.5}], ids=str)
def test_service_converges_to_the_weights_while_both_tenants_are_backlogged(weights):
    queue = FairQueue(weights)
    served: dict[str, int] = {}
    for number in range(4):
        queue.append(Req("a", f"a{number}", prompt_tokens=7, output_tokens=13))
        queue.append(Req("b", f"b{number}", prompt_tokens=11, output_tokens=5))
    for pick in range(600):
        head = admit_head(queue, served)
        queue.append(Req(head.tenant, f"{head.tenant}-again-{pick}", head.prompt_tokens, head.output_tokens))
    wanted = weights.get("a", 1.0) / weights.get("b", 1.0)
    assert served["a"] / served["b"] == pytest.approx(wanted, rel=0.05)


# ----- the lift -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "waiting, own, expected",
    [
        ({"a": 100.0, "b": 40.0}, 0.0, 40.0),  # lifted to the least backlogged counter
        ({"a": 100.0, "b": 40.0}, 70.0, 70.0),  # a larger counter of its own is kept
        ({}, 0.0, 0.0),  # nobody backlogged, nobody ever left: nothing to lift to
    ],
    ids=["lifted", "kept", "empty"],
)
def test_a_tenant_becoming_backlogged_is_lifted_to_the_least_backlogged_counter(waiting, own, expected):
    queue = FairQueue()
    for tenant in waiting:
        queue.append(Req(tenant, f"{tenant}1"))
    for tenant, service in waiting.items():
        queue.charge(tenant, prompt_tokens=int(service))
    queue.charge("c", prompt_tokens=int(own))
    queue.append(Req("c", "c1"))
    assert queue.counter("c") == expected


def test_with_nobody_backlogged_a_returning_tenant_is_lifted_to_the_last_tenant_to_leave():
    queue = FairQueue()
    a1, b1 = reqs("a1", "b1")
    queue.append(a1)
    queue.charge("a", prompt_tokens=10)
    queue.append(b1)  # lifted to 10
    queue.remove(b1)
    queue.remove(a1)  # a leaves last
    queue.charge("a", prompt_tokens=50)  # served while running, after leaving the queue
    queue.charge("b", prompt_tokens=5)
    queue.append(Req("b", "b2"))
    assert queue.counter("b") == 60.0


def test_only_the_first_waiting_request_lifts():
    queue = FairQueue()
    queue.append(Req("a", "a1"))
    queue.charge("a", prompt_tokens=30)
    queue.append(Req("b", "b1"))  # lifted to 30
    queue.charge("a", prompt_tokens=30)
    queue.append(Req("b", "b2"))  # b already waits: no lift
    assert queue.counter("b") == 30.0


def test_an_idle_tenant_returning_does_not_monopolise_the_server():
    queue = FairQueue()
    served: dict[str, int] = {}
    for tenant in "ab":
        for number in range(3):
            queue.append(Req(tenant, f"{tenant}{number}"))
    for pick in range(100):  # a and b share the server while c is idle
        head = admit_head(queue, served)
        queue.append(Req(head.tenant, f"{head.tenant}-again-{pick}"))
    for number in range(50):
        queue.append(Req("c", f"c{number}"))
    picks = []
    for pick in range(30):
        head = admit_head(queue, served)
        queue.append(Req(head.tenant, f"{head.tenant}-later-{pick}"))
        picks.append(head.tenant)
    assert picks.count("c") <= 11  # about a third, not all thirty
    assert all(set(picks[start : start + 4]) >= {"a", "b", "c"} for start in range(0, 27, 3))


# ----- preemption, removal, container ---------------------------------------------------------


def test_a_preempted_request_goes_back_first_in_its_tenants_queue():
    queue = FairQueue()
    a0, a1, a2 = reqs("a0", "a1", "a2")
    for request in (a0, a1, a2):
        queue.append(request)
    queue.remove(a0)  # admitted, then preempted
    queue.appendleft(a0)
    assert ids(queue) == ["a0", "a1", "a2"]


def test_a_preempted_request_is_not_lifted_and_wins_ties():
    queue = FairQueue()
    b1, a0 = Req("b", "b1"), Req("a", "a0")
    queue.append(a0)
    queue.append(b1)
    queue.remove(a0)  # a's only request is admitted; a leaves the queue
    queue.charge("a", prompt_tokens=10)
    queue.charge("b", prompt_tokens=10)
    queue.charge("b", prompt_tokens=20)
    queue.appendleft(a0)  # preempted: back without a lift, ahead of b on a tie
    assert queue.counter("a") == 10.0
    queue.charge("a", prompt_tokens=20)
    assert ids(queue) == ["a0", "b1"]


def test_remove_takes_out_exactly_that_request():
    queue = FairQueue()
    a1, a2, b1 = reqs("a1", "a2", "b1")
    lookalike = Req("a", "a2")
    for request in (a1, a2, lookalike, b1):
        queue.append(request)
    queue.remove(a2)
    assert a2 not in queue and lookalike in queue
    assert [request for request in queue] == [a1, lookalike, b1]
    assert len(queue) == 3


@pytest.mark.parametrize(
    "action",
    [
        lambda queue, request: queue.remove(request),
        lambda queue, request: (queue.append(request), queue.append(request)),
        lambda queue, request: (queue.append(request), queue.appendleft(request)),
    ],
    ids=["remove-not-waiting", "append-twice", "appendleft-while-waiting"],
)
def test_a_request_waits_at_most_once(action):
    with pytest.raises(ValueError, match="a1"):
        action(FairQueue(), Req("a", "a1"))


def test_len_bool_and_contains_follow_the_queue():
    queue = FairQueue()
    a1, b1 = reqs("a1", "b1")
    assert not queue and len(queue) == 0 and a1 not in queue and list(queue) == []
    queue.append(a1)
    queue.appendleft(b1)
    assert queue and len(queue) == 2 and a1 in queue and b1 in queue
    queue.remove(a1)
    queue.remove(b1)
    assert not queue and a1 not in queue


@pytest.mark.parametrize(
    "weights, costs",
    [
        pytest.param({"a": 0.0}, {}, id="zero-weight"),
        pytest.param({"a": -1.0}, {}, id="negative-weight"),
        pytest.param({"a": math.nan}, {}, id="nan-weight"),
        pytest.param({"a": True}, {}, id="bool-weight"),
        pytest.param({}, {"input_cost": -1.0}, id="negative-cost"),
        pytest.param({}, {"output_cost": math.inf}, id="infinite-cost"),
    ],
)
def test_bad_weights_and_costs_are_refused(weights, costs):
    with pytest.raises(ValueError):
        FairQueue(weights, **costs)


def test_negative_token_counts_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        FairQueue().charge("a", prompt_tokens=-1)


# ----- starvation -----------------------------------------------------------------------------


def test_a_heavy_tenant_with_ten_times_the_requests_does_not_starve_a_light_one():
    queue = FairQueue()
    served: dict[str, int] = {}
    arrived_at: dict[str, int] = {}
    waits: list[int] = []
    picks = 0
    for tick in range(200):  # each tick: 10 heavy arrivals, 1 light, room to admit 4
        for number in range(10):
            queue.append(Req("h", f"h{tick}-{number}"))
        light = Req("l", f"l{tick}")
        queue.append(light)
        arrived_at[light.request_id] = picks
        for _ in range(4):
            head = admit_head(queue, served)
            picks += 1
            if head.tenant == "l":
                waits.append(picks - arrived_at[head.request_id])
    assert len(waits) == 200  # every light request was admitted
    assert max(waits) <= 4  # within the tick it arrived in
    assert served["h"] > 2 * served["l"]  # and the heavy tenant took the spare capacity
