"""``bench.micro --rate``: the fixed-rate A/B mode drives a real server through ``bench.paced`` and counts what came
back, so CPU per request is divided by completed requests, not by requests sent."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from bench.micro import _Paced

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
REQUEST_END = b"\r\n\r\n"


@pytest.fixture
def origin() -> Iterator[tuple[str, int]]:
    """A keep-alive origin answering every (bodiless) request with 200 and a 1024-byte body."""
    listener = socket.create_server(("127.109.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            pending = b""
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                pending += data
                while REQUEST_END in pending:
                    _, _, pending = pending.partition(REQUEST_END)
                    conn.sendall(RESPONSE)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        acceptor.join(5)
        for t in threads:
            t.join(5)
        listener.close()


def test_paced_run_counts_completed_requests_at_the_rate(origin: tuple[str, int]) -> None:
    completed, rate, errors = _Paced(origin, rate=200.0, connections=2, seconds=1.0, preexec=None).run()
    assert (completed, errors) == (200, 0)
    assert rate == pytest.approx(200.0)


def test_paced_run_fails_when_nothing_listens() -> None:
    # The port was just freed: the connection is refused before any schedule starts, and the run says so.
    dead = socket.create_server(("127.109.0.2", 0))
    address = dead.getsockname()[:2]
    dead.close()
    with pytest.raises(RuntimeError, match="did not start"):
        _Paced(address, rate=100.0, connections=1, seconds=0.5, preexec=None).run()
