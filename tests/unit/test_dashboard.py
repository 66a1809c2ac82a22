"""The dashboard server over a synthetic mesh: the scraper's bookkeeping (proxies that fail or vanish), the
100-service graph built fast, and the HTTP endpoints the front end uses (real sockets on loopback)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from kizuna.controlplane.dashboard import Dashboard, Scraper, Target, http_get, static_dir
from kizuna.controlplane.dashboard_graph import History, graph
from kizuna.controlplane.dashboard_synthetic import SyntheticMesh


class Flaky(SyntheticMesh):
    """A synthetic mesh whose proxies can be made to fail or disappear."""

    def __init__(self, services: int) -> None:
        super().__init__(services)
        self.down: set[str] = set()
        self.gone: set[str] = set()

    def targets(self) -> list[Target]:
        return [t for t in super().targets() if t.id not in self.gone]

    async def fetch(self, url: str) -> str:
        if url.removeprefix("synthetic://") in self.down:
            raise OSError("connection refused")
        return await super().fetch(url)


def test_hundred_services_graph_is_built_fast() -> None:
    mesh = SyntheticMesh(100)
    history = History()
    scraper = Scraper(mesh, history, mesh.fetch)

    async def rounds() -> float:
        await scraper.round(now=1000.0)
        started = time.perf_counter()
        await scraper.round(now=1005.0)
        return time.perf_counter() - started

    scrape_seconds = asyncio.run(rounds())
    started = time.perf_counter()
    view = graph(history, mesh.topology(), now=1005.0)
    build_seconds = time.perf_counter() - started
    assert len([n for n in view["nodes"] if n["kind"] == "service"]) == 100
    assert len(view["nodes"]) == 100 + 200 + 1  # services, v1 and v2 of each, the gateway
    # The gateway calls svc-000 (2 workloads); each svc-i's 2 workloads call both of svc-(2i+1), svc-(2i+2).
    assert len(view["edges"]) == 2 + 4 * 99
    assert all(e["rps"] == pytest.approx(10.0) for e in view["edges"])  # 50 requests per 5 s
    erroring = [e for e in view["edges"] if e["service"].startswith("svc-003.")]
    assert erroring and all(e["errorRate"] == pytest.approx(0.1) for e in erroring)
    assert all(e["mtls"] for e in view["edges"])
    assert scrape_seconds < 2.0 and build_seconds < 0.5, (scrape_seconds, build_seconds)


def test_failed_and_vanished_proxies_are_rebased_not_counted_as_bursts() -> None:
    mesh = Flaky(3)
    history = History()
    scraper = Scraper(mesh, history, mesh.fetch)
    victim = "default/svc-001-v1"

    async def run() -> None:
        await scraper.round(now=0.0)
        mesh.down.add(victim)
        await scraper.round(now=5.0)  # the victim fails: no traffic from it in this interval
        assert "connection refused" in scraper.errors[victim]
        mesh.down.clear()
        await scraper.round(now=10.0)  # it answers again: first scrape after the gap, only a new base
        await scraper.round(now=15.0)
        mesh.gone.add(victim)
        await scraper.round(now=20.0)

    asyncio.run(run())
    assert victim not in scraper._last  # a vanished proxy is forgotten
    assert victim not in scraper.errors

    def into_victim(point_index: int) -> float:
        point = history.points[point_index]
        return sum(s.requests for (_, dest, _), s in point.edges.items() if dest.id == victim)

    # Counted only in an interval between two good scrapes: one scrape's worth (50 from each of its two
    # callers), never the gap.
    assert [into_victim(i) for i in range(4)] == [0.0, 0.0, 100.0, 0.0]


@pytest.fixture
def board() -> Any:
    mesh = SyntheticMesh(4)
    dashboard = Dashboard(mesh, fetch=mesh.fetch, interval=0.2)
    loop = asyncio.new_event_loop()
    address = loop.run_until_complete(dashboard.start("127.0.0.1", 0))
    # Serve from a thread-free loop: run it in short slices while the test talks to it.
    yield loop, f"http://{address[0]}:{address[1]}"
    loop.run_until_complete(dashboard.close())
    loop.close()


def _get(loop: asyncio.AbstractEventLoop, url: str, method: str = "GET") -> tuple[int, str, bytes]:
    async def call() -> tuple[int, str, bytes]:
        def blocking() -> tuple[int, str, bytes]:
            request = urllib.request.Request(url, method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.headers.get("content-type", ""), response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers.get("content-type", ""), exc.read()

        return await asyncio.to_thread(blocking)

    return loop.run_until_complete(call())


def test_http_endpoints(board: Any) -> None:
    loop, base = board
    loop.run_until_complete(asyncio.sleep(0.7))  # a few scrape rounds
    status, kind, body = _get(loop, base + "/")
    assert status == 200 and kind.startswith("text/html") and b'<div id="graph"' in body
    script = next(p for p in (static_dir() / "assets").iterdir() if p.suffix == ".js")
    status, kind, body = _get(loop, f"{base}/assets/{script.name}")
    assert status == 200 and "javascript" in kind and len(body) == script.stat().st_size
    status, _, body = _get(loop, base + "/api/graph?window=60")
    view = json.loads(body)
    assert status == 200 and any(e["rps"] > 0 for e in view["edges"])
    status, _, body = _get(loop, base + "/api/services/default/svc-001")
    service = json.loads(body)
    assert status == 200 and service["exists"] and any(v and v > 0 for v in service["series"]["rps"])
    assert [c["name"] for c in service["config"]] == ["svc-001"]
    assert "kind: DestinationRule" in service["config"][0]["yaml"]
    assert {p["workload"] for p in service["proxies"]} == {"svc-001-v1", "svc-001-v2"}
    assert service["inbound"] and all(e["service"] == service["fqdn"] for e in service["inbound"])
    assert _get(loop, base + "/api/services/default")[0] == 404
    assert _get(loop, base + "/../../pyproject.toml")[0] == 404
    assert _get(loop, base + "/api/graph", method="POST")[0] == 405
    assert json.loads(_get(loop, base + "/api/proxies")[2])["proxies"]
    traces = json.loads(_get(loop, base + "/api/traces")[2])["traces"]
    assert len(traces) == 3 and traces[0]["traceId"] == f"{3:032x}" and traces[0]["error"]  # newest first
    assert traces[0]["root"].startswith("istio-ingressgateway: ")
    spans = json.loads(_get(loop, f"{base}/api/traces/{traces[1]['traceId']}")[2])["spans"]
    assert len(spans) == 8  # four hops, a client and a server span each
    ids = {s["spanId"] for s in spans}
    assert sum(1 for s in spans if s["parentSpanId"] not in ids) == 1  # one root, every other span linked
    assert _get(loop, base + "/api/traces/" + "f" * 32)[0] == 404


def test_http_get_reads_a_real_server() -> None:
    async def run() -> tuple[str, str]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            text = await http_get(f"http://127.0.0.1:{port}/stats/prometheus")
        finally:
            server.close()
            await server.wait_closed()
        with pytest.raises(OSError):
            await http_get(f"http://127.0.0.1:{port}/stats/prometheus", timeout=1.0)
        return text, "ok"

    assert asyncio.run(run()) == ("hello world", "ok")


def test_kizuna_dashboard_prints_the_url_or_says_why_not(tmp_path: Any, capsys: Any) -> None:
    from kizuna.cli.main import main

    assert main(["dashboard", "--state-dir", str(tmp_path)]) == 1
    assert "no control plane is running" in capsys.readouterr().err
    (tmp_path / "controlplane.json").write_text(json.dumps({"address": "127.0.0.1:1", "pid": 1,
                                                             "dashboard": "http://127.0.0.1:20001/"}))
    assert main(["dashboard", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "http://127.0.0.1:20001/\n"
    (tmp_path / "controlplane.json").write_text(json.dumps({"address": "127.0.0.1:1", "pid": 1,
                                                             "dashboard": None}))
    assert main(["dashboard", "--state-dir", str(tmp_path)]) == 1
    assert "serves no dashboard" in capsys.readouterr().err
