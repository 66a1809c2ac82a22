"""VirtualService delegation: a root's ``http[].delegate`` replaced by the delegate's routes, merged as Istio
merges them (``pilot/pkg/model/virtualservice.go``: ``mergeHTTPRoute``, ``mergeHTTPMatchRequests``).

Each delegate route keeps its own settings and takes the root route's where it sets none (rewrite, timeout,
retries, fault, mirror(s), corsPolicy, headers). Its matches must each fall inside one of the root's: a
delegate match that conflicts with every root match (say root prefix ``/productpage`` and delegate exact
``/reviews``) drops the delegate route, as Istio does. Delegation is one level deep; a missing delegate
contributes no routes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kizuna.api.virtualservice import HTTPMatchRequest, HTTPRoute, StringMatch, VirtualServiceSpec

Lookup = Callable[[str, str], VirtualServiceSpec | None]
"""(namespace, name) → a delegate VirtualService's spec, if one exists."""

_INHERITED = ("rewrite", "direct_response", "timeout", "retries", "fault", "mirror", "mirror_percentage",
              "mirror_percent", "mirrors", "cors_policy", "headers")


def expand(routes: list[HTTPRoute], namespace: str, lookup: Lookup) -> Iterator[tuple[str, HTTPRoute]]:
    """(position label, route) for each route of a root, delegate routes merged in place of their root route.
    The label is ``http[i]`` or, for a delegated one, ``http[i]/<ns>/<name>.http[j]``."""
    for i, root in enumerate(routes):
        delegate = root.delegate
        if delegate is None:
            yield f"http[{i}]", root
            continue
        ns = delegate.namespace or namespace
        spec = lookup(ns, delegate.name)
        if spec is None or not spec.is_delegate:
            continue
        for j, leaf in enumerate(spec.http):
            merged = merge_route(root, leaf)
            if merged is not None:
                yield f"http[{i}]/{ns}/{delegate.name}.http[{j}]", merged


def merge_route(root: HTTPRoute, leaf: HTTPRoute) -> HTTPRoute | None:
    """``leaf`` with ``root``'s matches folded in and its unset settings taken from ``root``; None on conflict."""
    matches = merge_matches(root.match, leaf.match)
    if matches is None:
        return None
    update: dict[str, object] = {"match": matches, "delegate": None}
    if root.name:
        update["name"] = f"{root.name}-{leaf.name}" if leaf.name else root.name
    for name in _INHERITED:
        if name in HTTPRoute.model_fields and _unset(getattr(leaf, name)):
            update[name] = getattr(root, name)
    return leaf.model_copy(update=update)


def merge_matches(root: list[HTTPMatchRequest],
                  leaf: list[HTTPMatchRequest]) -> list[HTTPMatchRequest] | None:
    """Every leaf match combined with each root match it does not conflict with; None when a leaf match
    conflicts with all of them."""
    if not root:
        return leaf
    if not leaf:
        return root
    out = []
    for sub in leaf:
        found = [merge_match(top, sub) for top in root if not conflicts(top, sub)]
        if not found:
            return None
        out += found
    return out


def merge_match(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> HTTPMatchRequest:
    """The leaf's conditions, with the root's wherever the leaf sets none."""
    return leaf.model_copy(update={
        "name": f"{root.name}-{leaf.name}" if root.name and leaf.name else root.name or leaf.name,
        "uri": leaf.uri or root.uri, "scheme": leaf.scheme or root.scheme, "method": leaf.method or root.method,
        "authority": leaf.authority or root.authority,
        "headers": {**root.headers, **leaf.headers},
        "without_headers": {**root.without_headers, **leaf.without_headers},
        "query_params": {**root.query_params, **leaf.query_params},
        "port": leaf.port or root.port,
        "source_labels": {**root.source_labels, **leaf.source_labels},
        "source_namespace": leaf.source_namespace or root.source_namespace,
        "gateways": leaf.gateways or root.gateways,
        "ignore_uri_case": leaf.ignore_uri_case or root.ignore_uri_case})


def conflicts(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> bool:
    """Istio's ``hasConflict``: can ``leaf`` not narrow ``root``?"""
    for top, sub in ((root.uri, leaf.uri), (root.scheme, leaf.scheme), (root.method, leaf.method),
                     (root.authority, leaf.authority)):
        if _string_conflict(top, sub):
            return True
    for top_map, sub_map in ((root.headers, leaf.headers), (root.without_headers, leaf.without_headers),
                             (root.query_params, leaf.query_params)):
        for key, value in sub_map.items():
            if _string_conflict(top_map.get(key), value):
                return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port and leaf.port and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    if any(k in root.source_labels and root.source_labels[k] != v for k, v in leaf.source_labels.items()):
        return True
    return bool(root.gateways and leaf.gateways and not set(leaf.gateways) <= set(root.gateways))


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    if root is None or leaf is None:
        return False
    if root.regex and (leaf.regex or leaf.prefix or leaf.exact):
        return True
    if leaf.regex and (root.regex or root.prefix or root.exact):
        return True
    if root.exact is not None and root.exact != "":
        return leaf.prefix is not None and leaf.prefix != "" or leaf.exact != root.exact
    if root.prefix:
        if leaf.prefix and not leaf.prefix.startswith(root.prefix):
            return True
        if leaf.exact and not leaf.exact.startswith(root.prefix):
            return True
    return False


def _unset(value: object) -> bool:
    return value is None or value == [] or value == {}
