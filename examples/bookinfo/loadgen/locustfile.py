"""A little traffic for the Bookinfo demo (``make demo``): a few people reading the product page, now and then
signing in as jason (so the routing samples that match ``end-user: jason`` see traffic too) and out again, and
a client of the JSON API. Only paths the Bookinfo gateway routes are used.

Run by examples/bookinfo/loadgen/demo.py; by hand::

    locust -f examples/bookinfo/loadgen/locustfile.py --headless -u 3 -r 1 -H http://127.0.0.1:8080
"""

from __future__ import annotations

from locust import HttpUser, between, task


class Reader(HttpUser):
    """Someone browsing the shop."""

    wait_time = between(1, 3)

    @task(6)
    def product_page(self) -> None:
        self.client.get("/productpage")

    @task(2)
    def api(self) -> None:
        self.client.get("/api/v1/products")
        self.client.get("/api/v1/products/0/reviews", name="/api/v1/products/[id]/reviews")

    @task(1)
    def as_jason(self) -> None:
        self.client.post("/login", data={"username": "jason", "passwd": "jason"}, allow_redirects=False)
        self.client.get("/productpage", name="/productpage (jason)")
        self.client.get("/logout", allow_redirects=False)
