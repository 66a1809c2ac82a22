"""Consistent hashing: ring and Maglev tables, stability under endpoint churn, and request keys."""

from __future__ import annotations

from collections import Counter

import pytest

from kizuna.proxy.hashing import Maglev, Ring, build_table, hash_key, request_key, set_cookie_header
from kizuna.proxyconfig.policy import HashPolicy

NAMES = [f"127.70.0.{i}:8080" for i in range(1, 6)]
KEYS = [hash_key(b"user-%d" % i) for i in range(3000)]


def owners(table: Ring | Maglev, names: list[str]) -> list[str]:
    result = []
    for key in KEYS:
        index = table.lookup(key)
        assert index is not None
        result.append(names[index])
    return result


@pytest.mark.parametrize("make", [lambda n: Ring(n, 1024), lambda n: Maglev(n, 65537)], ids=["ring", "maglev"])
def test_tables_spread_keys_over_every_endpoint(make: object) -> None:
    counts = Counter(owners(make(NAMES), NAMES))  # type: ignore[operator]
    assert set(counts) == set(NAMES)
    assert min(counts.values()) > len(KEYS) / len(NAMES) / 2  # no endpoint starved


def test_ring_moves_only_the_keys_of_a_removed_endpoint() -> None:
    before = owners(Ring(NAMES), NAMES)
    rest = [n for n in NAMES if n != NAMES[2]]
    after = owners(Ring(rest), rest)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert moved and all(b == NAMES[2] for b, _ in moved)
    assert len(moved) == before.count(NAMES[2])


def test_ring_adding_an_endpoint_moves_keys_only_to_it() -> None:
    before = owners(Ring(NAMES), NAMES)
    more = [*NAMES, "127.70.0.9:8080"]
    after = owners(Ring(more), more)
    assert {a for b, a in zip(before, after, strict=True) if b != a} == {"127.70.0.9:8080"}


def test_maglev_keeps_almost_every_other_key_in_place() -> None:
    before = owners(Maglev(NAMES, 65537), NAMES)
    rest = [n for n in NAMES if n != NAMES[2]]
    after = owners(Maglev(rest, 65537), rest)
    removed = before.count(NAMES[2])
    others_moved = sum(1 for b, a in zip(before, after, strict=True) if b != a and b != NAMES[2])
    assert all(a != NAMES[2] for a in after)
    assert others_moved < 0.05 * (len(KEYS) - removed)  # Maglev's "minimal disruption", not zero


def test_tables_do_not_depend_on_the_process() -> None:
    assert owners(Ring(NAMES), NAMES) == owners(Ring(list(NAMES)), NAMES)
    assert hash_key(b"abc") == hash_key(b"abc") != hash_key(b"abd")


def test_empty_tables_have_no_owner() -> None:
    assert Ring([]).lookup(5) is None
    assert Maglev([], 7).lookup(5) is None


def test_build_table_follows_the_policy() -> None:
    assert isinstance(build_table(HashPolicy(header="x", algorithm="maglev", table_size=251), NAMES), Maglev)
    ring = build_table(HashPolicy(header="x", ring_size=100), NAMES)
    assert isinstance(ring, Ring) and len(ring.points) == 100 * len(NAMES)  # each endpoint: ring_size points


HEADERS = ((b"X-User", b"jason"), (b"Cookie", b"a=1; session=abc; b=2"))


def test_request_keys_from_each_source() -> None:
    assert request_key(HashPolicy(header="x-user"), HEADERS, b"/", None) == b"jason"
    assert request_key(HashPolicy(header="x-other"), HEADERS, b"/", None) is None
    assert request_key(HashPolicy(cookie="session"), HEADERS, b"/", None) == b"abc"
    assert request_key(HashPolicy(cookie="missing"), HEADERS, b"/", None) is None
    assert request_key(HashPolicy(source_ip=True), HEADERS, b"/", "127.70.1.1") == b"127.70.1.1"
    assert request_key(HashPolicy(query_param="u"), (), b"/p?a=1&u=bob", None) == b"bob"
    assert request_key(HashPolicy(query_param="u"), (), b"/p?uu=bob", None) is None


def test_set_cookie_header_carries_ttl_and_path() -> None:
    name, value = set_cookie_header(HashPolicy(cookie="user", cookie_path="/", cookie_ttl=60.0), b"v1")
    assert name == b"set-cookie"
    assert value == b"user=v1; Max-Age=60; Path=/; HttpOnly"
