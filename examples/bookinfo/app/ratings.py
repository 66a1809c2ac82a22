"""ratings: two reviewers' stars for a book, ``GET /ratings/<id>`` (JSON); ``GET /health``.

Two versions, chosen as Istio's ratings image chooses them (``SERVICE_VERSION``):

- v1 (unset): the ratings live in memory; ``POST /ratings/<id>`` replaces a book's;
- v2 (``SERVICE_VERSION=v2``): the ratings come from a database, ``DB_TYPE`` mongodb (the default) or mysql.
  Istio's v2 reads a MongoDB at ``MONGO_DB_URL``; ours reads an in-process store standing in for it, holding
  the documents Istio's MongoDB is seeded with (``{rating: 5}``, ``{rating: 4}``), so the stars are the same
  as v1's and what tells the versions apart is who served the request (the instance's log, the sidecars'
  stats). ``POST`` answers 501, as Istio's v2 does; ``DB_TYPE=mysql`` answers 500 (no MySQL here).
"""

from __future__ import annotations

import json
import os
import threading

from app.common import Request, Response, json_response, serve

DEFAULT_RATINGS = {"Reviewer1": 5, "Reviewer2": 4}
MONGODB_RATINGS = ({"rating": 5}, {"rating": 4})
"""The ``ratings`` collection of the stand-in MongoDB: Istio's samples/bookinfo/src/mongodb/ratings_data.json."""

_lock = threading.Lock()
_posted: dict[int, object] = {}


def ratings_of(product_id: int) -> dict[str, object]:
    """The ratings of ``product_id``: posted ones, else the defaults."""
    with _lock:
        ratings = _posted.get(product_id, DEFAULT_RATINGS)
    return {"id": product_id, "ratings": ratings}


def backed_by_database() -> bool:
    """v2: the ratings come from the database, and cannot be posted."""
    return os.environ.get("SERVICE_VERSION") == "v2"


def ratings_from_database(product_id: int) -> Response:
    """Istio's v2: the first two documents of the ``ratings`` collection are Reviewer1's and Reviewer2's."""
    if os.environ.get("DB_TYPE") == "mysql":
        return json_response({"error": "could not connect to ratings database"}, 500)
    first, second = MONGODB_RATINGS
    return json_response({"id": product_id, "ratings": {"Reviewer1": first["rating"],
                                                        "Reviewer2": second["rating"]}})


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
        if backed_by_database():
            return json_response({"error": "Post not implemented for database backed ratings"}, 501)
        with _lock:
            _posted[product_id] = posted
    elif backed_by_database():
        return ratings_from_database(product_id)
    return json_response(ratings_of(product_id))


if __name__ == "__main__":
    serve("ratings", app)
