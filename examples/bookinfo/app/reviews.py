"""reviews: two reviews of a book, ``GET /reviews/<id>`` (JSON), and ``GET /health``.

One program, three versions, chosen as Istio's reviews images choose them (their Dockerfiles set these):

- v1: ``ENABLE_RATINGS`` unset: no ratings, no call to ratings;
- v2: ``ENABLE_RATINGS=true``, ``STAR_COLOR=black`` (the default): calls ratings, waits up to 10 s;
- v3: ``ENABLE_RATINGS=true``, ``STAR_COLOR=red``: calls ratings, waits up to 2.5 s.

When ratings does not answer with 200 in time, each review carries ``{"error": "Ratings service is currently
unavailable"}`` instead of stars. The 10 s of v2 are deliberate: Istio's fault-injection task finds this "bug"
(productpage gives up on reviews long before reviews gives up on ratings).
"""

from __future__ import annotations

import os
import socket

from app.common import Request, Response, call, forward_headers, json_response, serve, service_url

RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    ("Reviewer2", "Absolutely fun and entertaining. The play lacks thematic depth when compared to other "
                  "plays by Shakespeare."),
)


def ratings_enabled() -> bool:
    """v2 and v3 show ratings."""
    return os.environ.get("ENABLE_RATINGS", "").lower() == "true"


def star_color() -> str:
    """black (v2) or red (v3)."""
    return os.environ.get("STAR_COLOR", "black")


def ratings_timeout() -> float:
    """How long this version waits for ratings: 10 s with black stars, else 2.5 s (as Istio's reviews)."""
    return 10.0 if star_color() == "black" else 2.5


def fetch_ratings(product_id: int, request: Request) -> dict[str, int] | None:
    """Reviewer → stars from the ratings service, or None when it fails or is too slow."""
    url = service_url("ratings", f"/ratings/{product_id}")
    reply = call(url, forward_headers(request), ratings_timeout())
    data = reply.json() if reply.status == 200 else None
    if not isinstance(data, dict) or not isinstance(data.get("ratings"), dict):
        return None
    return {str(k): int(v) for k, v in data["ratings"].items() if isinstance(v, int)}


def book_reviews(product_id: int, request: Request) -> dict[str, object]:
    """The reviews document, with ratings when this version shows them."""
    ratings = fetch_ratings(product_id, request) if ratings_enabled() else None
    reviews = []
    for reviewer, text in REVIEWS:
        review: dict[str, object] = {"reviewer": reviewer, "text": text}
        if ratings_enabled():
            stars = (ratings or {}).get(reviewer)
            review["rating"] = ({"stars": stars, "color": star_color()} if stars is not None
                                else {"error": RATINGS_UNAVAILABLE})
        reviews.append(review)
    return {"id": str(product_id), "podname": os.environ.get("HOSTNAME") or socket.gethostname(),
            "clustername": os.environ.get("CLUSTER_NAME", "null"), "reviews": reviews}


def app(request: Request) -> Response:
    """Route one request."""
    if request.path == "/health":
        return json_response({"status": "Reviews is healthy"})
    if request.path.startswith("/reviews/") and request.method in ("GET", "HEAD"):
        try:
            product_id = int(request.path.rsplit("/", 1)[1])
        except ValueError:
            return json_response({"error": "please provide numeric product id"}, 400)
        return json_response(book_reviews(product_id, request))
    return json_response({"error": "not found"}, 404)


if __name__ == "__main__":
    serve("reviews", app)
