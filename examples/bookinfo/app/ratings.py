"""ratings: two reviewers' stars for a book, ``GET /ratings/<id>`` (JSON); ``POST /ratings/<id>`` replaces
them in memory (as Istio's ratings v1 does); ``GET /health``."""

from __future__ import annotations

import json
import threading

from app.common import Request, Response, json_response, serve

DEFAULT_RATINGS = {"Reviewer1": 5, "Reviewer2": 4}

_lock = threading.Lock()
_posted: dict[int, object] = {}


def ratings_of(product_id: int) -> dict[str, object]:
    """The ratings of ``product_id``: posted ones, else the defaults."""
    with _lock:
        ratings = _posted.get(product_id, DEFAULT_RATINGS)
    return {"id": product_id, "ratings": ratings}


def app(request: Request) -> Response:
    """Route one request."""
    if request.path == "/health":
        return json_response({"status": "Ratings is healthy"})
    if not request.path.startswith("/ratings/"):
        return json_response({"error": "not found"}, 404)
    try:
        product_id = int(request.path.rsplit("/", 1)[1])
    except ValueError:
        return json_response({"error": "please provide numeric product ID"}, 400)
    if request.method == "POST":
        try:
            posted = json.loads(request.body)
        except ValueError:
            return json_response({"error": "please provide valid ratings JSON"}, 400)
        with _lock:
            _posted[product_id] = posted
    return json_response(ratings_of(product_id))


if __name__ == "__main__":
    serve("ratings", app)
