"""Load balancing: which endpoint of a cluster gets the next request, and which cluster of a weighted route.

Balancers pick among items that expose ``active`` (requests in flight), in practice the per-endpoint pools.
``pick(exclude)`` prefers items not in ``exclude`` (a retry goes to another endpoint when there is one).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Generic, Protocol, TypeVar

from kizuna.proxyconfig.model import LbPolicy, WeightedCluster


class Loaded(Protocol):
    """Anything a balancer can choose: it knows how many requests it has in flight."""

    active: int


T = TypeVar("T", bound=Loaded)


class Balancer(Generic[T]):
    """Base: holds the items; ``pick`` returns None only when there are none."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[T]) -> None:
        self.items = tuple(items)

    def pick(self, exclude: Collection[T] = ()) -> T | None:
        raise NotImplementedError

    def _candidates(self, exclude: Collection[T]) -> tuple[T, ...]:
        if not exclude:
            return self.items
        rest = tuple(i for i in self.items if i not in exclude)
        return rest or self.items


class RoundRobin(Balancer[T]):
    """Each item in turn (Envoy ROUND_ROBIN without weights)."""

    __slots__ = ("_next",)

    def __init__(self, items: Sequence[T]) -> None:
        super().__init__(items)
        # Start at a random place so that many proxies with the same config do not all hit item 0 first.
        self._next = random.randrange(len(self.items)) if self.items else 0

    def pick(self, exclude: Collection[T] = ()) -> T | None:
        items = self.items
        n = len(items)
        for _ in range(n):
            item = items[self._next % n]
            self._next = (self._next + 1) % n
            if item not in exclude:
                return item
        return items[self._next % n] if n else None


class LeastRequest(Balancer[T]):
    """Power of two choices: two random items, the one with fewer requests in flight (Envoy's default)."""

    __slots__ = ()

    def pick(self, exclude: Collection[T] = ()) -> T | None:
        items = self._candidates(exclude) if exclude else self.items
        n = len(items)
        if n <= 1:
            return items[0] if n else None
        if n == 2:
            a, b = items
            if a.active == b.active:  # a tie must not always favour the first endpoint
                return a if random.random() < 0.5 else b
        else:
            a, b = random.sample(items, 2)
        return b if b.active < a.active else a


class Random(Balancer[T]):
    """A uniformly random item."""

    __slots__ = ()

    def pick(self, exclude: Collection[T] = ()) -> T | None:
        items = self._candidates(exclude)
        return random.choice(items) if items else None


def make_balancer(policy: LbPolicy, items: Sequence[T]) -> Balancer[T]:
    """The balancer for a DestinationRule ``simple`` policy. PASSTHROUGH has no endpoints to choose from here;
    it falls back to LEAST_REQUEST over whatever endpoints the cluster has."""
    if policy == "ROUND_ROBIN":
        return RoundRobin(items)
    if policy == "RANDOM":
        return Random(items)
    return LeastRequest(items)


def pick_weighted(clusters: Sequence[WeightedCluster], rand: float | None = None) -> WeightedCluster:
    """One of a route's destinations, chosen at random in proportion to weight (all zero: the first).

    ``rand`` in [0, 1) replaces the random draw (tests).
    """
    if len(clusters) == 1:
        return clusters[0]
    total = sum(c.weight for c in clusters)
    if total <= 0:
        return clusters[0]
    point = (random.random() if rand is None else rand) * total
    for c in clusters:
        point -= c.weight
        if point < 0:
            return c
    return clusters[-1]
