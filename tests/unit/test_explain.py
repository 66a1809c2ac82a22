"""Why a route did not match, condition by condition, in the order the router checks them."""

from __future__ import annotations

from kizuna.proxy.explain import explain
from kizuna.proxyconfig.model import (
    Cluster,
    HeaderMatch,
    Route,
    RouteAction,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)


def snapshot() -> Snapshot:
    def route(name: str, *matches: RouteMatch) -> Route:
        return Route(name, matches, RouteAction((WeightedCluster(f"c-{name}", 100),)), "VirtualService d/web")

    routes = (
        route("api", RouteMatch(uri=StringMatch("prefix", "/api"), method=StringMatch("exact", "POST"))),
        route("beta", RouteMatch(query_params=(HeaderMatch("beta", StringMatch("exact", "1")),)),
              RouteMatch(headers=(HeaderMatch("x-beta"),))),
        route("rest"),
    )
    clusters = tuple(Cluster(f"c-{n}", "web.d.svc.cluster.local", 80, "", "http", "ROUND_ROBIN", ())
                     for n in ("api", "beta", "rest"))
    return Snapshot("1", virtual_hosts=(VirtualHost("web:80", ("web",), 80, "http", routes),), clusters=clusters)


def test_each_skipped_route_says_which_condition_failed() -> None:
    result = explain(snapshot(), "web", 80, "GET", "/api/items?beta=2", {"host": "web"})
    assert result.route is not None and result.route.name == "rest"
    api, beta, rest = result.routes
    assert api.reasons == ("method GET does not match exact 'POST'",)
    assert beta.reasons == ("query parameter beta is '2' (wants exact '1')", "header x-beta is absent (wants present)")
    assert rest.matched and not api.matched and not beta.matched
    assert [(w, name) for w, _, name in result.clusters] == [(100, "c-rest")]


def test_no_virtual_host_means_no_route() -> None:
    result = explain(snapshot(), "other", 80, "GET", "/", {"host": "other"})
    assert result.virtual_host is None and result.route is None
