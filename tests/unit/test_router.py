"""Route selection with Istio's HTTPMatchRequest semantics, on snapshots built by hand."""

from __future__ import annotations

import pytest

from kizuna.proxy.router import Router
from kizuna.proxyconfig.model import (
    HeaderMatch,
    Route,
    RouteAction,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)


def route(name: str, *matches: RouteMatch) -> Route:
    return Route(name, matches, RouteAction((WeightedCluster(f"c-{name}", 100),)))


def router(*routes: Route, port: int = 80) -> Router:
    vh = VirtualHost("reviews", ("reviews", "reviews.default", "reviews.default.svc",
                                 "reviews.default.svc.cluster.local"), port, "http", routes)
    return Router(Snapshot("1", virtual_hosts=(vh,)))


def select(r: Router, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
           host: str = "reviews", port: int = 80) -> str | None:
    found = r.select(host, port, method, path, {"host": host, **(headers or {})})
    return found.name if found else None


def exact(v: str, ignore_case: bool = False) -> StringMatch:
    return StringMatch("exact", v, ignore_case)


def prefix(v: str, ignore_case: bool = False) -> StringMatch:
    return StringMatch("prefix", v, ignore_case)


def regex(v: str) -> StringMatch:
    return StringMatch("regex", v)


def test_every_service_name_and_only_its_port_finds_the_virtual_host() -> None:
    r = router(route("all"))
    for host in ("reviews", "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local"):
        assert select(r, host=host) == "all"
    assert select(r, host="reviews", port=8080) is None
    assert select(r, host="ratings") is None
    assert r.virtual_host("reviews", 80) is not None


def test_first_matching_route_wins() -> None:
    r = router(route("v2", RouteMatch(uri=prefix("/api"))), route("v3", RouteMatch(uri=prefix("/api/v3"))),
               route("default"))
    assert select(r, "/api/v3/x") == "v2"
    assert select(r, "/other") == "default"


def test_no_route_when_nothing_matches() -> None:
    assert select(router(route("only", RouteMatch(uri=exact("/a")))), "/b") is None


@pytest.mark.parametrize(("match", "path", "hit"), [
    (exact("/reviews/1"), "/reviews/1", True),
    (exact("/reviews/1"), "/reviews/1?x=2", True),   # the query string is not part of the uri
    (exact("/reviews/1"), "/reviews/12", False),
    (prefix("/reviews"), "/reviews/1", True),
    (prefix("/reviews"), "/ratings", False),
    (regex("/reviews/[0-9]+"), "/reviews/42", True),
    (regex("/reviews/[0-9]+"), "/reviews/42/x", False),  # regex must match the whole path
    (exact("/Reviews", ignore_case=True), "/REVIEWS", True),
    (prefix("/API", ignore_case=True), "/api/v1", True),
    (prefix("/API"), "/api/v1", False),
])
def test_uri_match(match: StringMatch, path: str, hit: bool) -> None:
    r = router(route("m", RouteMatch(uri=match)))
    assert (select(r, path) == "m") is hit


def test_header_conditions() -> None:
    r = router(
        route("jason", RouteMatch(headers=(HeaderMatch("end-user", exact("jason")),))),
        route("beta", RouteMatch(headers=(HeaderMatch("x-version", prefix("beta")),))),
        route("present", RouteMatch(headers=(HeaderMatch("x-canary"),))),
        route("default"),
    )
    assert select(r, headers={"end-user": "jason"}) == "jason"
    assert select(r, headers={"end-user": "json"}) == "default"
    assert select(r, headers={"x-version": "beta-2"}) == "beta"
    assert select(r, headers={"x-canary": ""}) == "present"
    assert select(r) == "default"


def test_without_headers_excludes() -> None:
    r = router(route("not-debug", RouteMatch(without_headers=(HeaderMatch("x-debug"),))), route("default"))
    assert select(r) == "not-debug"
    assert select(r, headers={"x-debug": "1"}) == "default"
    r = router(route("not-jason", RouteMatch(without_headers=(HeaderMatch("end-user", exact("jason")),))),
               route("default"))
    assert select(r, headers={"end-user": "mary"}) == "not-jason"
    assert select(r, headers={"end-user": "jason"}) == "default"


def test_query_params() -> None:
    r = router(route("exact", RouteMatch(query_params=(HeaderMatch("version", exact("2")),))),
               route("regex", RouteMatch(query_params=(HeaderMatch("id", regex("[0-9]+")),))),
               route("present", RouteMatch(query_params=(HeaderMatch("debug"),))),
               route("default"))
    assert select(r, "/p?version=2") == "exact"
    assert select(r, "/p?version=3") == "default"
    assert select(r, "/p?id=123&x=y") == "regex"
    assert select(r, "/p?id=12a") == "default"
    assert select(r, "/p?debug") == "present"
    assert select(r, "/p") == "default"


def test_method_authority_and_port() -> None:
    r = router(route("post", RouteMatch(method=exact("POST"))),
               route("auth", RouteMatch(authority=prefix("reviews.default"))),
               route("port", RouteMatch(port=80)),
               route("never", RouteMatch(port=9999)))
    assert select(r, method="POST") == "post"
    assert select(r, host="reviews.default.svc") == "auth"
    assert select(r, host="reviews") == "port"


def test_conditions_in_one_match_all_hold_and_matches_of_a_route_are_alternatives() -> None:
    both = RouteMatch(uri=prefix("/api"), headers=(HeaderMatch("end-user", exact("jason")),))
    r = router(route("and", both), route("or", RouteMatch(uri=exact("/a")), RouteMatch(uri=exact("/b"))),
               route("default"))
    assert select(r, "/api", headers={"end-user": "jason"}) == "and"
    assert select(r, "/api") == "default"
    assert select(r, "/a") == "or" and select(r, "/b") == "or"


def test_first_virtual_host_to_claim_a_name_keeps_it() -> None:
    a = VirtualHost("a", ("shared",), 80, "http", (route("a"),))
    b = VirtualHost("b", ("shared", "other"), 80, "http", (route("b"),))
    r = Router(Snapshot("1", virtual_hosts=(a, b)))
    assert select(r, host="shared") == "a"
    assert select(r, host="other") == "b"
