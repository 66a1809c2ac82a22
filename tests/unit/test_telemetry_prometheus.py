"""The runtime's Prometheus: file-SD targets from the runtime record, the generated scrape config, and the
cases where ``kizuna up`` does not start it (turned off, address taken) with the note it prints."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from kizuna.runtime import prometheus
from kizuna.runtime.state import StateDir

RUNTIME: dict[str, Any] = {
    "instances": [{"name": "httpbin-v1-0", "namespace": "default", "meshAddress": "127.87.1.3"},
                  {"name": "sleep-0", "namespace": "default", "meshAddress": "127.87.1.5"}],
    "controlPlane": "127.87.1.1:15010",
    "gateway": {"address": "127.0.0.1", "port": 8080},
}


def test_targets_list_every_sidecar_and_the_gateway_on_the_status_port(tmp_path: Path) -> None:
    groups = prometheus.targets_of(RUNTIME)
    assert [g["targets"] for g in groups] == [["127.87.1.3:15020"], ["127.87.1.5:15020"], ["127.87.1.1:15020"]]
    assert groups[0]["labels"] == {"instance_id": "httpbin-v1-0.default", "role": "sidecar"}
    assert prometheus.targets_of({**RUNTIME, "gateway": None})[-1]["labels"]["role"] == "sidecar"
    state = StateDir(tmp_path)
    path = prometheus.write_targets(state, groups)
    assert json.loads(path.read_text()) == groups


def test_scrape_config_uses_file_sd_and_istio_metrics_path(tmp_path: Path) -> None:
    config = json.loads(prometheus.config_text(tmp_path / "targets.json"))  # JSON is valid YAML
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["file_sd_configs"] == [{"files": [str(tmp_path / "targets.json")], "refresh_interval": "5s"}]


def test_not_started_when_off_or_address_taken(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    record, note = prometheus.start(None, state, "off", RUNTIME, {})  # type: ignore[arg-type]
    assert record is None and "off" in note
    with socket.socket() as busy:
        busy.bind(("127.87.0.9", 0))
        busy.listen()
        taken = f"127.87.0.9:{busy.getsockname()[1]}"
        assert not prometheus.port_free(taken)
        if prometheus.binary() is not None:
            record, note = prometheus.start(None, state, taken, RUNTIME, {})  # type: ignore[arg-type]
            assert record is None and f"{taken} is taken" in note
    assert prometheus.port_free(taken)
