"""``make demo``: Bookinfo in the mesh with a little load, until Ctrl-C.

1. ``kizuna up --detach examples/bookinfo``: the app, its ingress gateway and the default destination rules
   (transparent mode when run as root with ``ip`` and ``iptables``, proxy mode otherwise); options this
   script does not know (``--mode``, ``--gateway-port``, ...) go to ``kizuna up``;
2. a headless locust (``locustfile.py`` beside this file, a few users) sends traffic through the gateway at
   http://127.0.0.1:8080; if the gateway does not answer, locust runs inside the mesh instead, as a client of
   productpage's sidecar (``kizuna exec productpage-v1 -- python -m locust ...``);
3. prints where to look, and waits: Ctrl-C (or SIGTERM, or the terminal closing) stops locust, then the whole
   mesh (``kizuna down``).

Standard library only; ``python`` must be the one kizuna and locust are installed in (``make demo`` does
that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

BOOKINFO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
GATEWAY_WAIT = 10.0
"""Seconds to wait for the gateway to serve /productpage once the mesh is ready."""


def _kizuna(*args: str) -> list[str]:
    return [sys.executable, "-m", "kizuna", *args]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to the gateway
    try:
        with opener.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _wait_for(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _answers(url):
            return True
        time.sleep(0.25)
    return False


def _gateway_url(record: dict[str, Any]) -> str | None:
    """Where ``kizuna up`` put the ingress gateway (``--gateway-address``, ``--gateway-port``), if any."""
    gateway = record.get("gateway")
    return f"http://{gateway['address']}:{gateway['port']}" if gateway else None


def _productpage_url(record: dict[str, Any]) -> str:
    """productpage through its sidecar's inbound listener."""
    instance = next(i for i in record["instances"] if i["deployment"] == "productpage-v1")
    return f"http://{instance['meshAddress']}:9080/productpage"


def _locust(args: argparse.Namespace, host: str) -> list[str]:
    return ["python", "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(args.users),
            "--spawn-rate", "1", "--run-time", args.run_time, "--host", host, "--only-summary",
            "--loglevel", "WARNING"]


class _HungUp(KeyboardInterrupt):
    """The terminal went away (SIGHUP): stop as on Ctrl-C, with nowhere left to print."""


def _stop_gracefully(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGHUP:
        raise _HungUp
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description="Bookinfo in the mesh with a little load")
    parser.add_argument("--state-dir", default=os.environ.get("KIZUNA_STATE_DIR", ".kizuna"))
    parser.add_argument("--users", type=int, default=3, help="locust users (default 3)")
    parser.add_argument("--run-time", default="1h", help="stop the load after this long (default 1h)")
    args, up_options = parser.parse_known_args(argv)
    state_dir = Path(args.state_dir).absolute()
    state = ["--state-dir", str(state_dir)]

    began = time.monotonic()
    # Every request traced in the demo (Istio's default is 1%); a --trace-sampling given wins (it comes later).
    up = subprocess.run(_kizuna("up", "--detach", *state, "--trace-sampling", "100", *up_options, str(BOOKINFO)))
    if up.returncode != 0:
        return up.returncode
    signal.signal(signal.SIGTERM, _stop_gracefully)
    signal.signal(signal.SIGHUP, _stop_gracefully)
    locust: subprocess.Popen[bytes] | None = None
    quiet = False
    try:
        record = json.loads((state_dir / "runtime.json").read_text())  # what `kizuna up` started, and where
        gateway = _gateway_url(record)
        page = f"{gateway}/productpage"
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        if gateway is not None and _wait_for(page, GATEWAY_WAIT):
            locust = subprocess.Popen(_locust(args, gateway), env=env)
        else:
            why = f"the ingress gateway does not answer {page}" if gateway else "no ingress gateway runs"
            print(f"\n{why}; the load goes to productpage inside the mesh instead", flush=True)
            page = _productpage_url(record)
            locust = subprocess.Popen(_kizuna("exec", *state, "productpage-v1", "--",
                                              *_locust(args, "http://productpage:9080")), env=env)
        board = json.loads((state_dir / "controlplane.json").read_text()).get("dashboard")
        lines = [f"\nBookinfo is ready in {time.monotonic() - began:.1f}s:  {page}"]
        if board:
            lines.append(f"dashboard: {board}   traces: kizuna traces --state-dir {state_dir}")
        lines += [f"load: {args.users} locust users for up to {args.run_time} (summary on exit)",
                  f"try:  kizuna apply --state-dir {state_dir} -f examples/bookinfo/networking/"
                  "virtual-service-all-v1.yaml",
                  "Ctrl-C stops the load and the mesh\n"]
        print("\n".join(lines), flush=True)
        locust.wait()
        print("the load has finished; the mesh runs until Ctrl-C", flush=True)
        while True:
            time.sleep(3600)
    except _HungUp:
        quiet = True
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not leave the mesh running
        if locust is not None and locust.poll() is None:
            locust.terminate()  # locust stops its users and prints its summary
            try:
                locust.wait(timeout=10)
            except subprocess.TimeoutExpired:
                locust.kill()
                locust.wait()
        # With the terminal gone, writing to it fails: the mesh is stopped all the same.
        if not quiet:
            print("\nstopping the mesh", flush=True)
        output = subprocess.DEVNULL if quiet else None
        subprocess.run(_kizuna("down", *state), stdout=output, stderr=output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
