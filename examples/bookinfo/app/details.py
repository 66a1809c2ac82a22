"""details: the book's facts, ``GET /details/<id>`` (JSON), and ``GET /health``."""

from __future__ import annotations

from app.common import Request, Response, json_response, serve


def book_details(product_id: int) -> dict[str, object]:
    """The one book Bookinfo knows, whatever the id (as in Istio's details v1)."""
    return {"id": product_id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
            "pages": 200, "publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890",
            "ISBN-13": "123-1234567890"}


def app(request: Request) -> Response:
    """Route one request."""
    if request.path == "/health":
        return json_response({"status": "Details is healthy"})
    if request.path.startswith("/details/") and request.method in ("GET", "HEAD"):
        try:
            product_id = int(request.path.rsplit("/", 1)[1])
        except ValueError:
            return json_response({"error": "please provide numeric product id"}, 400)
        return json_response(book_details(product_id))
    return json_response({"error": "not found"}, 404)


if __name__ == "__main__":
    serve("details", app)
