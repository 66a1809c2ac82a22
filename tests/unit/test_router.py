"""Route selection with Istio's HTTPMatchRequest semantics, on snapshots built by hand."""

from __future__ import annotations

import pytest

from kizuna.proxy.router import HeadersWithClaims, Router, why_not
from kizuna.proxyconfig.model import (
    ClaimMatch,
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


# Claims of Istio's demo tokens (security/tools/jwt/samples): groups-scope.jwt has list claims, demo.jwt none.
GROUPS_SCOPE = {"iss": "testing@secure.istio.io", "sub": "testing@secure.istio.io",
                "groups": ["group1", "group2"], "scope": ["scope1", "scope2"]}
DEMO = {"iss": "testing@secure.istio.io", "sub": "testing@secure.istio.io", "foo": "bar"}


def select_with(r: Router, claims: dict[str, object] | None, path: str = "/") -> str | None:
    found = r.select("reviews", 80, "GET", path, HeadersWithClaims({"host": "reviews"}, claims))
    return found.name if found else None


def test_claim_conditions_read_the_verified_token_not_headers() -> None:
    r = router(route("group1", RouteMatch(claims=(ClaimMatch(("groups",), exact("group1")),))),
               route("foo", RouteMatch(claims=(ClaimMatch(("foo",), prefix("b")),))),
               route("nested", RouteMatch(claims=(ClaimMatch(("org", "team"), exact("mesh")),))),
               route("has-scope", RouteMatch(claims=(ClaimMatch(("scope",)),))),
               route("default"))
    assert select_with(r, GROUPS_SCOPE) == "group1"  # a list claim holds when any element matches
    assert select_with(r, {**GROUPS_SCOPE, "groups": ["group2"]}) == "has-scope"
    assert select_with(r, DEMO) == "foo"
    assert select_with(r, {"org": {"team": "mesh"}}) == "nested"
    assert select_with(r, {"org": {"team": "other"}, "groups": "group1"}) == "group1"  # a string claim too
    assert select_with(r, {"groups": [1, True], "foo": 7}) == "default"  # non-strings never equal a string
    assert select_with(r, None) == "default"  # no verified token: no claim holds
    # A header spelled like the key is just a header: it cannot stand in for a verified claim.
    assert select(r, headers={"@request.auth.claims.groups": "group1", "groups": "group1"}) == "default"


def test_without_claims_excludes_matching_tokens_only() -> None:
    r = router(route("not-group1", RouteMatch(without_claims=(ClaimMatch(("groups",), exact("group1")),))),
               route("default"))
    assert select_with(r, GROUPS_SCOPE) == "default"
    assert select_with(r, DEMO) == "not-group1"
    assert select_with(r, None) == "not-group1"  # Envoy's inverted metadata match: no token, no match to invert


@pytest.mark.parametrize(("match", "path", "headers", "claims", "reason"), [
    (RouteMatch(port=9080), "/", {}, None, "port 80 is not 9080"),
    (RouteMatch(uri=prefix("/api")), "/web?q=1", {}, None, "uri '/web' does not match prefix '/api'"),
    (RouteMatch(uri=prefix("/API", True)), "/web", {}, None, "uri '/web' does not match prefix '/API', any case"),
    (RouteMatch(method=exact("POST")), "/", {}, None, "method GET does not match exact 'POST'"),
    (RouteMatch(authority=exact("a")), "/", {}, None, "authority 'reviews' does not match exact 'a'"),
    (RouteMatch(headers=(HeaderMatch("end-user", exact("jason")),)), "/", {"end-user": "mary"}, None,
     "header end-user is 'mary' (wants exact 'jason')"),
    (RouteMatch(without_headers=(HeaderMatch("x-debug"),)), "/", {"x-debug": "1"}, None,
     "header x-debug is present and matches present (withoutHeaders)"),
    (RouteMatch(query_params=(HeaderMatch("v", regex("[0-9]")),)), "/?v=x", {}, None,
     "query parameter v is 'x' (wants regex '[0-9]')"),
    (RouteMatch(claims=(ClaimMatch(("groups",), exact("group1")),)), "/", {}, None,
     "claim @request.auth.claims.groups: the request has no verified JWT (wants exact 'group1')"),
    (RouteMatch(claims=(ClaimMatch(("groups",), exact("group1")),)), "/", {}, DEMO,
     "claim @request.auth.claims.groups is absent (wants exact 'group1')"),
    (RouteMatch(without_claims=(ClaimMatch(("groups",), exact("group1")),)), "/", {}, GROUPS_SCOPE,
     "claim @request.auth.claims.groups is present and matches exact 'group1' (withoutHeaders)"),
    # Conditions are checked in one order, the first failure is the one reported.
    (RouteMatch(uri=prefix("/api"), method=exact("POST")), "/web", {}, None, "uri '/web' does not match prefix '/api'"),
])
def test_why_not_words_the_first_failing_condition(match: RouteMatch, path: str, headers: dict[str, str],
                                                   claims: dict[str, object] | None, reason: str) -> None:
    request = HeadersWithClaims({"host": "reviews", **headers}, claims)
    assert why_not(match, 80, "GET", path, request) == reason
    # The verdict is the router's: a match with a reason is one select() skips.
    assert Router(Snapshot("1", virtual_hosts=(VirtualHost("r", ("reviews",), 80, "http", (
        route("m", match), route("default"))),))).select("reviews", 80, "GET", path, request).name == "default"


def test_why_not_is_none_exactly_when_the_match_holds() -> None:
    match = RouteMatch(uri=prefix("/api"), claims=(ClaimMatch(("scope",), exact("scope2")),))
    assert why_not(match, 80, "GET", "/api/x", HeadersWithClaims({"host": "reviews"}, GROUPS_SCOPE)) is None
    assert why_not(match, 80, "GET", "/api/x", {"host": "reviews"}) is not None
