"""Where Istio's sample and task YAML (the compatibility corpus) lives for tests.

``KIZUNA_ISTIO_SAMPLES`` names it; otherwise ``../shared/istio-samples`` beside the checkout, then
``/work/shared/istio-samples``. Tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]


def istio_samples() -> Path:
    """The corpus directory (which may not exist)."""
    candidates = [Path(p) for p in (os.environ.get("KIZUNA_ISTIO_SAMPLES"),) if p]
    candidates += [_REPO.parent / "shared" / "istio-samples", Path("/work/shared/istio-samples")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


ISTIO_SAMPLES = istio_samples()

GITHUB_RAW = "https://raw.githubusercontent.com/istio/istio/master"
"""Where Istio's task pages fetch sample files from (``jwksUri``); tests serve the corpus locally instead."""


@contextlib.contextmanager
def serve_directory(directory: Path, address: str) -> Iterator[str]:
    """Serve ``directory`` over HTTP on ``address`` (a free port) while the block runs: a local stand-in for
    raw.githubusercontent.com/istio/istio/master. Yields the base URL."""
    server = http.server.ThreadingHTTPServer((address, 0),
                                             functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass
