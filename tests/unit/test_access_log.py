"""The access log file: buffered JSON lines written on flush, rotation at the size bound with one old file kept,
a timer that flushes on its own, and ``kizuna logs`` reading (and following) it."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import threading
import time
from pathlib import Path

from kizuna.cli.logs import log_path, run
from kizuna.proxy.access_log import HTTP_FIELDS, AccessLog, iso_time
from kizuna.runtime.state import StateDir


def entry(log: AccessLog, code: int = 200, path: str = "/get") -> None:
    log.http("2026-11-27T00:00:00.000Z", "GET", path, "HTTP/1.1", code, "-", 0, 12, 1.5, "127.0.0.1:80",
             "outbound|80||a", "rid", "a:80", None, None, "source", None)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_entries_wait_for_flush_then_are_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.access.log"
    log = AccessLog(str(path))
    entry(log)
    entry(log, 503)
    assert not path.exists()  # nothing written on the request path
    log.flush()
    got = lines(path)
    assert [e["response_code"] for e in got] == [200, 503]
    assert list(got[0]) == list(HTTP_FIELDS)
    log.tcp("2026-11-27T00:00:00.000Z", "TCP", "-", 5, 7, 2.0, "127.0.0.1:9000", None, "cluster.local/ns/a/sa/b",
            "destination")
    log.flush()
    assert lines(path)[-1]["bytes_sent"] == 7 and lines(path)[-1]["protocol"] == "TCP"


def test_rotation_keeps_one_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.access.log"
    log = AccessLog(str(path), max_bytes=1000)
    for round_ in range(3):
        for _ in range(10):
            entry(log, path=f"/round{round_}")
        log.flush()
    old = Path(str(path) + ".1")
    assert old.exists() and not Path(str(path) + ".2").exists()
    assert all(e["path"] == "/round2" for e in lines(old))
    assert not path.exists() or path.stat().st_size <= 1000


def test_timer_flushes_without_being_asked(tmp_path: Path) -> None:
    path = tmp_path / "a.access.log"

    async def main() -> None:
        log = AccessLog(str(path))
        log.start(asyncio.get_running_loop())
        entry(log)
        deadline = time.monotonic() + 3
        while not path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.close()

    asyncio.run(main())
    assert len(lines(path)) == 1


def test_iso_time() -> None:
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"


def test_kizuna_logs_prints_and_follows_the_access_log(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.create()
    (state.logs / "httpbin-v1-0.default.proxy.log").write_text("")  # no mesh runs: found by its files
    path = log_path(state, "httpbin-v1-0.default", "access")
    path.write_text('{"n": 1}\n')
    out = io.BytesIO()
    args = argparse.Namespace(workload="httpbin", namespace=None, access=True, proxy=False, follow=False)
    assert run(state, args, out) == 0
    assert out.getvalue() == b'{"n": 1}\n'

    class Stop(Exception):
        pass

    class Sink(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            n = super().write(data)
            if b'"n": 3' in self.getvalue():
                raise Stop
            return n

    followed = Sink()

    def rotate() -> None:
        time.sleep(0.3)
        path.rename(str(path) + ".1")
        path.write_text('{"n": 3}\n')

    thread = threading.Thread(target=rotate)
    thread.start()
    try:
        run(state, argparse.Namespace(**{**vars(args), "follow": True}), followed)
    except Stop:
        pass
    thread.join()
    assert followed.getvalue() == b'{"n": 1}\n{"n": 3}\n'
