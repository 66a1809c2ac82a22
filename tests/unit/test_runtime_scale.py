"""``kizuna scale`` without a mesh, the status table of Deployments, and where a new replica goes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kizuna.cli.main import main
from kizuna.runtime.addresses import PodRange
from kizuna.runtime.display import deployment_rows


def test_scale_needs_replicas_and_a_running_mesh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "httpbin", "--state-dir", str(tmp_path)]) == 2
    assert "--replicas" in capsys.readouterr().err
    assert main(["scale", "httpbin", "--replicas", "2", "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"kizuna: no mesh is running in {tmp_path} (start one with kizuna up)\n"
    missing = tmp_path / "missing"
    assert main(["scale", "httpbin", "--replicas", "2", "--state-dir", str(missing)]) == 1
    assert capsys.readouterr().err == f"kizuna: no mesh is running in {missing} (start one with kizuna up)\n"


def test_deployments_table_counts_ready_over_running() -> None:
    instances = [{"name": f"httpbin-{i}", "namespace": "default", "deployment": "httpbin"} for i in range(3)]
    instances.append({"name": "sleep-0", "namespace": "tools", "deployment": "sleep"})
    proxies = [{"id": "httpbin-0.default", "connected": True, "ready": True},
               {"id": "httpbin-1.default", "connected": True, "ready": False},
               {"id": "httpbin-2.default", "connected": False, "ready": True},
               {"id": "sleep-0.tools", "connected": True, "ready": True}]
    assert deployment_rows(instances, proxies) == [["DEPLOYMENT", "NAMESPACE", "READY"],
                                                   ["httpbin", "default", "1/3"], ["sleep", "tools", "1/1"]]


def test_a_new_replica_takes_the_lowest_free_addresses() -> None:
    from kizuna.runtime.scale import _free_slots
    from kizuna.runtime.workloads import Instance

    pods = PodRange(ipaddress.IPv4Network("127.102.9.0/24"))

    def at(slot: int) -> Instance:
        pod, mesh = pods.instance_addresses(slot)
        return Instance(f"a-{slot}", "a", "default", "default", (), pod, mesh, (), ("true",), (), "/", None)

    assert _free_slots(pods, [at(0), at(2)], 2, transparent=False) == [1, 3]
    assert pods.instance_addresses(1) == ("127.102.9.4", "127.102.9.5")
