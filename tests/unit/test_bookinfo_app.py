"""Bookinfo's services (examples/bookinfo/app) on their own, without the mesh: each runs as a real process on
a loopback address, port 9080, and finds the others through Istio's ``<SERVICE>_HOSTNAME`` variables.

A recording server stands in for a service when a test needs to see what reaches it (headers, tries) or to
make it fail. Addresses come from 127.82.200.0/21 (one /24 per test process, so concurrent runs do not meet).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
PORT = 9080
DETAILS = {"id": 0, "author": "William Shakespeare", "year": 1595, "type": "paperback", "pages": 200,
           "publisher": "PublisherA", "language": "English", "ISBN-10": "1234567890",
           "ISBN-13": "123-1234567890"}
REVIEW1 = "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"
REVIEW2 = ("Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by "
           "Shakespeare.")
DETAILS_SORRY = "Sorry, product details are currently unavailable for this book."
REVIEWS_SORRY = "Sorry, product reviews are currently unavailable for this book."
RATINGS_SORRY = "Ratings service is currently unavailable"
TRACING = {"x-request-id": "req-42", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
           "tracestate": "congo=t61rcWkgMzE", "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
           "x-b3-spanid": "e457b5a2e4d86bd1", "x-b3-parentspanid": "05e3ac9a4f6e3b90", "x-b3-sampled": "1",
           "x-b3-flags": "1", "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
           "user-agent": "bookinfo-test/1.0"}
_NEXT = iter(range(2, 255))
_BLOCK = f"127.82.{200 + os.getpid() % 8}"


def address() -> str:
    """A fresh loopback address for one server of this test process."""
    return f"{_BLOCK}.{next(_NEXT)}"


@dataclass
class Seen:
    """One request a Recorder received."""

    method: str
    target: str
    """The request target as sent: origin form (``/reviews/0``) or, through a proxy, absolute."""
    headers: dict[str, str]


@dataclass
class Recorder:
    """A stand-in service: records every request and answers ``status``/``body`` after ``delay`` seconds."""

    host: str
    status: int = 200
    body: Any = field(default_factory=dict)
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)

    def targets(self) -> list[str]:
        return [s.target for s in self.seen]


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    """``recorder(status=200, body={...}, delay=0)`` → a Recorder listening on a fresh address, port 9080."""
    servers: list[ThreadingHTTPServer] = []

    def start(**kwargs: Any) -> Recorder:
        rec = Recorder(address(), **kwargs)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                headers = {k.lower(): v for k, v in self.headers.items()}
                rec.seen.append(Seen(self.command, self.path, headers))
                time.sleep(rec.delay)
                data = json.dumps(rec.body).encode()
                try:
                    self.send_response(rec.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, as some tests want

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer((rec.host, PORT), Handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return rec

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _clean_env(**extra: str) -> dict[str, str]:
    drop = {"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
            "all_proxy", "POD_IP", "HOSTNAME", "ENABLE_RATINGS", "STAR_COLOR", "SERVICE_VERSION", "DB_TYPE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.endswith("_HOSTNAME")}
    env.update(extra)
    return env


def _listening(host: str) -> bool:
    try:
        socket.create_connection((host, PORT), timeout=0.2).close()
        return True
    except OSError:
        return False


@dataclass
class Service:
    """A Bookinfo service process and where it listens."""

    name: str
    host: str
    process: subprocess.Popen[bytes]
    started_in: float

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            body: str | None = None, timeout: float = 15.0) -> tuple[int, dict[str, str], str]:
        """``(status, headers, body)`` of one request."""
        connection = http.client.HTTPConnection(self.host, PORT, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            text = response.read().decode()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, text
        finally:
            connection.close()

    def json(self, path: str, headers: dict[str, str] | None = None) -> Any:
        status, _, text = self.get(path, headers)
        assert status == 200, text
        return json.loads(text)


@pytest.fixture
def bookinfo() -> Iterator[Callable[..., Service]]:
    """``bookinfo(name, **env)`` → a running service (``python -m app.<name>``) on a fresh address."""
    started: list[Service] = []

    def start(name: str, **env: str) -> Service:
        host = address()
        begin = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", f"app.{name}", "--host", host], cwd=BOOKINFO,
                                   env=_clean_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        service = Service(name, host, process, 0.0)
        started.append(service)
        deadline = begin + 10
        while not _listening(host):
            if process.poll() is not None:
                pytest.fail(f"{name} exited: {process.stderr.read().decode() if process.stderr else ''}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not listen on {host}:{PORT} within 10 s")
            time.sleep(0.02)
        service.started_in = time.monotonic() - begin
        return service

    try:
        yield start
    finally:
        for service in started:
            service.process.terminate()
        for service in started:
            try:
                service.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
            if service.process.stderr:
                service.process.stderr.close()


def _hosts(**services: Service | Recorder | str) -> dict[str, str]:
    """``details=svc`` → ``{"DETAILS_HOSTNAME": svc.host}``."""
    return {f"{k.upper()}_HOSTNAME": v if isinstance(v, str) else v.host for k, v in services.items()}


def _stars(page: str, color: str) -> int:
    return page.count(f'<font color="{color}">')


# --- details, ratings, reviews ----------------------------------------------------------------------------

def test_details_returns_the_books_facts_and_health(bookinfo: Callable[..., Service]) -> None:
    details = bookinfo("details")
    assert details.started_in < 1.0
    assert details.json("/details/0") == DETAILS
    assert details.json("/details/7")["id"] == 7
    assert details.json("/health") == {"status": "Details is healthy"}
    status, headers, text = details.get("/details/abc")
    assert (status, json.loads(text)) == (400, {"error": "please provide numeric product id"})
    assert headers["content-type"] == "application/json"


def test_ratings_returns_two_reviewers_stars_and_keeps_posted_ones(bookinfo: Callable[..., Service]) -> None:
    ratings = bookinfo("ratings")
    assert ratings.started_in < 1.0
    assert ratings.json("/ratings/0") == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert ratings.json("/health") == {"status": "Ratings is healthy"}
    status, _, text = ratings.get("/ratings/1", method="POST", body='{"Reviewer1": 1, "Reviewer2": 2}',
                                  headers={"Content-Type": "application/json"})
    assert status == 200 and json.loads(text) == {"id": 1, "ratings": {"Reviewer1": 1, "Reviewer2": 2}}
    assert ratings.json("/ratings/1")["ratings"] == {"Reviewer1": 1, "Reviewer2": 2}
    assert ratings.json("/ratings/0")["ratings"] == {"Reviewer1": 5, "Reviewer2": 4}


def test_ratings_v2_reads_its_database_and_refuses_posts(bookinfo: Callable[..., Service]) -> None:
    """Istio's ratings v2: the stars come from the database (an in-process stand-in for MongoDB, seeded as
    Istio's), a POST is 501, and with ``DB_TYPE=mysql`` (no MySQL here) the database cannot be reached."""
    ratings = bookinfo("ratings", SERVICE_VERSION="v2", MONGO_DB_URL="mongodb://mongodb:27017/test")
    assert ratings.started_in < 1.0
    assert ratings.json("/ratings/3") == {"id": 3, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert ratings.json("/health") == {"status": "Ratings is healthy"}
    status, _, text = ratings.get("/ratings/1", method="POST", body='{"Reviewer1": 1, "Reviewer2": 2}',
                                  headers={"Content-Type": "application/json"})
    assert (status, json.loads(text)) == (501, {"error": "Post not implemented for database backed ratings"})
    assert ratings.json("/ratings/1")["ratings"] == {"Reviewer1": 5, "Reviewer2": 4}
    mysql = bookinfo("ratings", SERVICE_VERSION="v2", DB_TYPE="mysql")
    status, _, text = mysql.get("/ratings/0")
    assert (status, json.loads(text)) == (500, {"error": "could not connect to ratings database"})


def test_reviews_v1_has_no_ratings_and_never_calls_ratings(bookinfo: Callable[..., Service],
                                                           recorder: Callable[..., Recorder]) -> None:
    ratings = recorder()
    reviews = bookinfo("reviews", HOSTNAME="reviews-v1-0", **_hosts(ratings=ratings))
    assert reviews.started_in < 1.0
    assert reviews.json("/reviews/0") == {
        "id": "0", "podname": "reviews-v1-0", "clustername": "null",
        "reviews": [{"reviewer": "Reviewer1", "text": REVIEW1}, {"reviewer": "Reviewer2", "text": REVIEW2}]}
    assert reviews.json("/health") == {"status": "Reviews is healthy"}
    assert ratings.seen == []


@pytest.mark.parametrize("color", ["black", "red"])
def test_reviews_v2_v3_show_the_ratings_in_their_color(bookinfo: Callable[..., Service], color: str) -> None:
    ratings = bookinfo("ratings")
    reviews = bookinfo("reviews", ENABLE_RATINGS="true", STAR_COLOR=color, **_hosts(ratings=ratings))
    data = reviews.json("/reviews/0")
    assert data["reviews"] == [
        {"reviewer": "Reviewer1", "text": REVIEW1, "rating": {"stars": 5, "color": color}},
        {"reviewer": "Reviewer2", "text": REVIEW2, "rating": {"stars": 4, "color": color}}]


def test_reviews_says_ratings_unavailable_when_ratings_fails(bookinfo: Callable[..., Service],
                                                             recorder: Callable[..., Recorder]) -> None:
    failing = recorder(status=500, body={"error": "fault"})
    reviews = bookinfo("reviews", ENABLE_RATINGS="true", STAR_COLOR="red", **_hosts(ratings=failing))
    ratings = [r["rating"] for r in reviews.json("/reviews/0")["reviews"]]
    assert ratings == [{"error": RATINGS_SORRY}] * 2
    nobody = bookinfo("reviews", ENABLE_RATINGS="true", **_hosts(ratings=address()))  # nothing listens there
    assert [r["rating"] for r in nobody.json("/reviews/0")["reviews"]] == [{"error": RATINGS_SORRY}] * 2


def test_reviews_v3_waits_two_and_a_half_seconds_for_ratings(bookinfo: Callable[..., Service],
                                                             recorder: Callable[..., Recorder]) -> None:
    slow = recorder(body={"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}, delay=4.0)
    reviews = bookinfo("reviews", ENABLE_RATINGS="true", STAR_COLOR="red", **_hosts(ratings=slow))
    began = time.monotonic()
    ratings = [r["rating"] for r in reviews.json("/reviews/0")["reviews"]]
    took = time.monotonic() - began
    assert ratings == [{"error": RATINGS_SORRY}] * 2
    assert 2.3 < took < 3.5


def test_reviews_forwards_tracing_and_end_user_to_ratings(bookinfo: Callable[..., Service],
                                                          recorder: Callable[..., Recorder]) -> None:
    ratings = recorder(body={"id": 0, "ratings": {"Reviewer1": 3, "Reviewer2": 2}})
    reviews = bookinfo("reviews", ENABLE_RATINGS="true", **_hosts(ratings=ratings))
    data = reviews.json("/reviews/0", {**TRACING, "end-user": "jason", "x-unrelated": "no"})
    assert data["reviews"][0]["rating"] == {"stars": 3, "color": "black"}
    [seen] = ratings.seen
    assert seen.target == "/ratings/0"
    for name, value in {**TRACING, "end-user": "jason"}.items():
        assert seen.headers.get(name) == value, name
    assert "x-unrelated" not in seen.headers


# --- productpage ------------------------------------------------------------------------------------------

@pytest.fixture
def backends(bookinfo: Callable[..., Service]) -> dict[str, Service]:
    """details, ratings and reviews v2 (black stars), running."""
    ratings = bookinfo("ratings")
    return {"details": bookinfo("details"), "ratings": ratings,
            "reviews": bookinfo("reviews", ENABLE_RATINGS="true", STAR_COLOR="black",
                                **_hosts(ratings=ratings))}


def test_productpage_shows_details_and_black_stars(bookinfo: Callable[..., Service],
                                                   backends: dict[str, Service]) -> None:
    page = bookinfo("productpage", **_hosts(**backends))
    assert page.started_in < 1.0
    status, headers, html = page.get("/productpage")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "The Comedy of Errors" in html and "Book Details" in html and "PublisherA" in html
    assert REVIEW1 in html and "Reviewer2" in html
    assert _stars(html, "black") == 2 and _stars(html, "red") == 0
    assert "★★★★★" in html and "★★★★☆" in html
    assert "Sorry" not in html
    assert page.get("/health")[2] == "Product page is healthy"


def test_productpage_serves_the_stylesheet_its_pages_link(bookinfo: Callable[..., Service]) -> None:
    page = bookinfo("productpage", **_hosts(details=address(), reviews=address()))  # nothing listens there
    for path in ("/", "/productpage"):
        assert '<link rel="stylesheet" href="static/bookinfo.css">' in page.get(path)[2]
    status, headers, css = page.get("/static/bookinfo.css")
    assert status == 200 and headers["content-type"].startswith("text/css") and "font-family" in css
    assert page.get("/static/nothing.css")[0] == 404


def test_productpage_json_api(bookinfo: Callable[..., Service], backends: dict[str, Service]) -> None:
    page = bookinfo("productpage", **_hosts(**backends))
    [product] = page.json("/api/v1/products")
    assert product["id"] == 0 and product["title"] == "The Comedy of Errors"
    assert page.json("/api/v1/products/0") == DETAILS
    assert page.json("/api/v1/products/0/reviews")["reviews"][1]["rating"] == {"stars": 4, "color": "black"}
    assert page.json("/api/v1/products/0/ratings") == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert page.get("/nothing")[0] == 404


def test_productpage_falls_back_when_details_or_reviews_are_down(bookinfo: Callable[..., Service],
                                                                 backends: dict[str, Service]) -> None:
    no_details = bookinfo("productpage", **_hosts(details=address(), reviews=backends["reviews"]))
    status, _, html = no_details.get("/productpage")
    assert status == 200
    assert "Error fetching product details!" in html and DETAILS_SORRY in html
    assert _stars(html, "black") == 2
    status, _, text = no_details.get("/api/v1/products/0")
    assert (status, json.loads(text)) == (500, {"error": DETAILS_SORRY})

    no_reviews = bookinfo("productpage", **_hosts(details=backends["details"], reviews=address()))
    status, _, html = no_reviews.get("/productpage")
    assert status == 200
    assert "Error fetching product reviews!" in html and REVIEWS_SORRY in html
    assert "PublisherA" in html and "<font" not in html


def test_productpage_tries_reviews_twice_then_passes_the_status_on(bookinfo: Callable[..., Service],
                                                                   recorder: Callable[..., Recorder]) -> None:
    details, reviews = recorder(body=DETAILS), recorder(status=503, body={"error": "no healthy upstream"})
    page = bookinfo("productpage", **_hosts(details=details, reviews=reviews))
    assert REVIEWS_SORRY in page.get("/productpage")[2]
    assert reviews.targets() == ["/reviews/0", "/reviews/0"]
    status, _, text = page.get("/api/v1/products/0/reviews")
    assert (status, json.loads(text)) == (503, {"error": REVIEWS_SORRY})


def test_login_cookie_becomes_end_user_on_calls_to_reviews(bookinfo: Callable[..., Service],
                                                           recorder: Callable[..., Recorder]) -> None:
    details, reviews = recorder(body=DETAILS), recorder(body={"id": "0", "reviews": []})
    page = bookinfo("productpage", **_hosts(details=details, reviews=reviews))
    status, headers, _ = page.get("/login", method="POST", body="username=jason&passwd=x",
                                  headers={"Content-Type": "application/x-www-form-urlencoded",
                                           "Referer": "http://bookinfo.local/productpage"})
    assert status == 302 and headers["location"] == "http://bookinfo.local/productpage"
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie == "user=jason"

    _, _, html = page.get("/productpage", {"Cookie": cookie})
    assert "jason" in html and "sign out" in html
    assert reviews.seen[-1].headers["end-user"] == "jason"
    _, _, html = page.get("/productpage")
    assert "Sign in" in html and "end-user" not in reviews.seen[-1].headers

    status, headers, _ = page.get("/logout", {"Cookie": cookie})
    assert status == 302 and headers["location"] == "/productpage"
    assert headers["set-cookie"].startswith("user=;") and "Max-Age=0" in headers["set-cookie"]


def test_productpage_forwards_tracing_headers_to_details_and_reviews(
        bookinfo: Callable[..., Service], recorder: Callable[..., Recorder]) -> None:
    details, reviews = recorder(body=DETAILS), recorder(body={"id": "0", "reviews": []})
    page = bookinfo("productpage", **_hosts(details=details, reviews=reviews))
    page.get("/productpage", {**TRACING, "Cookie": "user=jason", "x-unrelated": "no"})
    for service in (details, reviews):
        [seen] = service.seen
        for name, value in TRACING.items():
            assert seen.headers.get(name) == value, (service.host, name)
        assert seen.headers.get("end-user") == "jason"
        assert seen.headers.get("cookie") == "user=jason"
        assert "x-unrelated" not in seen.headers


def test_calls_go_to_http_proxy_by_service_name_despite_no_proxy(bookinfo: Callable[..., Service],
                                                                 recorder: Callable[..., Recorder]) -> None:
    """What kizuna's proxy mode sets (HTTP_PROXY = the sidecar, NO_PROXY = loopback and the pod range): every
    call leaves for the proxy with the service's name in an absolute URI, none bypasses it."""
    sidecar = recorder(body=DETAILS)
    proxy = f"http://{sidecar.host}:{PORT}"
    no_proxy = f"localhost,127.0.0.1,::1,{_BLOCK}.0/24"
    page = bookinfo("productpage", HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY=no_proxy, no_proxy=no_proxy)
    page.get("/productpage")
    assert sidecar.targets() == ["http://details:9080/details/0", "http://reviews:9080/reviews/0"]
    assert sidecar.seen[0].headers["host"] == "details:9080"
