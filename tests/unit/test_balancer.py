"""Endpoint balancers and the weighted choice of a route's clusters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from kizuna.proxy.balancer import LeastRequest, Random, RoundRobin, make_balancer, pick_weighted
from kizuna.proxyconfig.model import WeightedCluster


@dataclass(eq=False)
class Item:
    name: str
    active: int = 0


def items(n: int) -> list[Item]:
    return [Item(f"e{i}") for i in range(n)]


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    endpoints = items(3)
    rr = RoundRobin(endpoints)
    picks = [rr.pick() for _ in range(9)]
    first = endpoints.index(picks[0])  # type: ignore[arg-type]
    expected = [endpoints[(first + i) % 3] for i in range(9)]
    assert picks == expected


def test_round_robin_skips_excluded_endpoints() -> None:
    endpoints = items(3)
    rr = RoundRobin(endpoints)
    picks = {rr.pick(exclude=[endpoints[1]]).name for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"e0", "e2"}


def test_least_request_prefers_the_idle_endpoint() -> None:
    busy, idle = Item("busy", active=3), Item("idle", active=0)
    lr = LeastRequest([busy, idle])
    assert all(lr.pick() is idle for _ in range(100))


def test_least_request_spreads_sequential_requests_over_two_idle_endpoints() -> None:
    # Sequential traffic leaves both endpoints idle at every pick: a tie must not always go to the first one.
    picks = Counter(LeastRequest(items(2)).pick().name for _ in range(2000))  # type: ignore[union-attr]
    assert 800 < picks["e0"] < 1200


def test_least_request_never_picks_the_busiest_of_several() -> None:
    endpoints = [Item("a", 0), Item("b", 1), Item("c", 5)]
    lr = LeastRequest(endpoints)
    picks = Counter(lr.pick().name for _ in range(2000))  # type: ignore[union-attr]
    assert picks["c"] == 0
    assert picks["a"] > picks["b"] > 0


def test_retry_prefers_another_endpoint_but_falls_back_to_the_same() -> None:
    a, b = items(2)
    for balancer in (LeastRequest([a, b]), Random([a, b]), RoundRobin([a, b])):
        assert all(balancer.pick(exclude=[a]) is b for _ in range(20))
        assert balancer.pick(exclude=[a, b]) in (a, b)
    single = Item("only")
    assert LeastRequest([single]).pick(exclude=[single]) is single


def test_random_spreads_picks() -> None:
    picks = Counter(Random(items(4)).pick().name for _ in range(4000))  # type: ignore[union-attr]
    assert set(picks) == {"e0", "e1", "e2", "e3"}
    assert all(800 < n < 1200 for n in picks.values())


def test_no_endpoints_picks_nothing() -> None:
    for policy in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"):
        assert make_balancer(policy, []).pick() is None  # type: ignore[arg-type]


def test_policy_names_map_to_balancers() -> None:
    assert isinstance(make_balancer("ROUND_ROBIN", items(2)), RoundRobin)
    assert isinstance(make_balancer("RANDOM", items(2)), Random)
    assert isinstance(make_balancer("LEAST_REQUEST", items(2)), LeastRequest)


def test_weighted_choice_fifty_fifty() -> None:
    clusters = [WeightedCluster("v1", 50), WeightedCluster("v2", 50)]
    picks = Counter(pick_weighted(clusters).cluster for _ in range(4000))
    assert 0.45 <= picks["v1"] / 4000 <= 0.55


def test_weighted_choice_ninety_ten_and_zero_weight() -> None:
    clusters = [WeightedCluster("v1", 90), WeightedCluster("v2", 10), WeightedCluster("v3", 0)]
    picks = Counter(pick_weighted(clusters).cluster for _ in range(4000))
    assert 0.87 <= picks["v1"] / 4000 <= 0.93
    assert picks["v3"] == 0


@pytest.mark.parametrize(("rand", "expected"), [(0.0, "v1"), (0.249, "v1"), (0.25, "v2"), (0.999, "v2")])
def test_weighted_choice_boundaries(rand: float, expected: str) -> None:
    clusters = [WeightedCluster("v1", 25), WeightedCluster("v2", 75)]
    assert pick_weighted(clusters, rand).cluster == expected


def test_weighted_choice_single_or_all_zero_takes_the_first() -> None:
    assert pick_weighted([WeightedCluster("only", 0)]).cluster == "only"
    assert pick_weighted([WeightedCluster("a", 0), WeightedCluster("b", 0)]).cluster == "a"
