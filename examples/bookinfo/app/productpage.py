"""productpage: the Bookinfo web page and its JSON API; the only service users call.

- ``GET /productpage``: the book, its details (from details) and reviews (from reviews), as HTML;
- ``POST /login`` (form field ``username``) and ``GET /logout``: the user is kept in the ``user`` cookie, and
  every call to reviews then carries ``end-user: <user>`` (what the routing samples match on);
- ``GET /api/v1/products``, ``/api/v1/products/<id>``, ``.../<id>/reviews``, ``.../<id>/ratings``: JSON;
- ``GET /health``, ``GET /`` (an index with links), ``GET /static/bookinfo.css`` (the pages' stylesheet).

Calls to details and reviews wait 3 s and are tried twice; when both tries fail the page says so ("Sorry,
product ... are currently unavailable for this book."). Tracing headers, ``user-agent``, ``cookie``,
``authorization`` and ``jwt`` are forwarded, as Istio's productpage forwards them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

from app import page
from app.common import (
    TRACE_HEADERS,
    Request,
    Response,
    call,
    forward_headers,
    json_response,
    serve,
    service_url,
)

CALL_TIMEOUT = 3.0
"""Seconds productpage waits for details or reviews (Istio's productpage: 3 s)."""
TRIES = 2
"""One retry: with a 3 s timeout a slow reviews costs about 6 s (Istio's fault-injection task counts on
it)."""
FORWARDED = (*TRACE_HEADERS, "user-agent", "cookie", "authorization", "jwt")
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."

PRODUCTS = [{
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
                       "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his "
                       "shortest and one of his most farcical comedies, with a major part of the humour "
                       "coming from slapstick and mistaken identity, in addition to puns and word play.",
}]


def user_of(request: Request) -> str:
    """The signed-in user (the ``user`` cookie), or ''."""
    return unquote(request.cookie("user") or "")


def outgoing_headers(request: Request) -> dict[str, str]:
    """What calls made for ``request`` carry: the forwarded headers, and ``end-user`` for a signed-in user
    (else an ``end-user`` the caller sent, so ``curl -H 'end-user: jason'`` works like a login)."""
    headers = forward_headers(request, FORWARDED)
    user = user_of(request) or request.headers.get("end-user")
    if user:
        headers["end-user"] = user
    return headers


def fetch(service: str, path: str, headers: dict[str, str], unavailable: str, tries: int
          ) -> tuple[int, dict[str, Any]]:
    """``(status, document)`` from ``service``, or its status (500 when none came) and ``{"error": ...}``."""
    status = 500
    for _ in range(tries):
        reply = call(service_url(service, path), headers, CALL_TIMEOUT)
        data = reply.json()
        if reply.status == 200 and isinstance(data, dict):
            return 200, data
        status = reply.status or 500
    return status, {"error": unavailable}


def product_details(product_id: object, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return fetch("details", f"/details/{product_id}", headers, DETAILS_UNAVAILABLE, TRIES)


def product_reviews(product_id: object, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return fetch("reviews", f"/reviews/{product_id}", headers, REVIEWS_UNAVAILABLE, TRIES)


def product_ratings(product_id: object, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return fetch("ratings", f"/ratings/{product_id}", headers, RATINGS_UNAVAILABLE, 1)


def _redirect_back(request: Request, cookie: str) -> Response:
    # Back where the form was (Istio redirects to the referrer); the page itself when there is none.
    location = request.headers.get("referer") or "/productpage"
    return Response(302, b"", "text/html", (("Location", location), ("Set-Cookie", cookie)))


def _html(body: str, status: int = 200) -> Response:
    return Response(status, body.encode(), "text/html; charset=utf-8")


def app(request: Request) -> Response:
    """Route one request."""
    path = request.path
    if path in ("/", "/index.html"):
        return _html(page.index())
    if path == "/health":
        return Response(200, b"Product page is healthy", "text/plain; charset=utf-8")
    if path == page.STYLESHEET_PATH:
        return Response(200, page.STYLE.encode(), "text/css; charset=utf-8")
    if path == "/login" and request.method == "POST":
        user = request.form().get("username", "")
        return _redirect_back(request, f"user={quote(user)}; Path=/")
    if path == "/logout":
        return _redirect_back(request, "user=; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
    if path == "/productpage":
        headers = outgoing_headers(request)
        details_status, details = product_details(0, headers)
        reviews_status, reviews = product_reviews(0, headers)
        return _html(page.product_page(PRODUCTS[0], user_of(request), details_status, details,
                                       reviews_status, reviews))
    if path.rstrip("/") == "/api/v1/products":
        return json_response(PRODUCTS)
    parts = path.split("/")
    if path.startswith("/api/v1/products/") and len(parts) in (5, 6) and parts[4]:
        headers = outgoing_headers(request)
        what = parts[5] if len(parts) == 6 else ""
        fetcher = {"": product_details, "reviews": product_reviews, "ratings": product_ratings}.get(what)
        if fetcher is not None:
            status, document = fetcher(parts[4], headers)
            return json_response(document, status)
    return _html(page.not_found(), 404)


if __name__ == "__main__":
    serve("productpage", app)
