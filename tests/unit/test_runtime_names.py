"""Transparent mode's name files and kube-proxy rules, from the control plane's answers."""

from __future__ import annotations

import os
from pathlib import Path

from kizuna.runtime.kubeproxy import ServicePortEndpoints, dnat_rules, service_endpoints
from kizuna.runtime.names import hosts_text, vips_of, write_in_place

SERVICES = [
    {"kind": "Service", "metadata": {"name": "httpbin", "namespace": "default"},
     "spec": {"clusterIP": "10.211.4.10", "ports": [{"name": "http", "port": 8000, "targetPort": 80}]}},
    {"kind": "Service", "metadata": {"name": "redis", "namespace": "cache"},
     "spec": {"clusterIP": "10.211.4.11", "ports": [{"name": "tcp-redis", "port": 6379, "targetPort": "redis"}]}},
    {"kind": "Service", "metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": []}},
    {"kind": "Service", "metadata": {"name": "pending"}, "spec": {"ports": []}},
]


def test_hosts_file_has_every_kubernetes_name_of_each_service() -> None:
    text = hosts_text("sleep-0", "10.210.4.2", "default", vips_of(SERVICES))
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "10.210.4.2\tsleep-0" in lines
    # Short names only for the instance's own namespace, as a cluster's resolv.conf search path gives.
    assert "10.211.4.10\thttpbin.default.svc.cluster.local httpbin.default.svc httpbin.default httpbin" in lines
    assert "10.211.4.11\tredis.cache.svc.cluster.local redis.cache.svc redis.cache" in lines
    assert not any("headless" in line or "pending" in line for line in lines)


def test_rewrite_keeps_the_inode_a_bind_mount_pins(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    write_in_place(path, "a long first version of the file\n")
    inode = os.stat(path).st_ino
    write_in_place(path, "short\n")
    assert (os.stat(path).st_ino, path.read_text()) == (inode, "short\n")


REGISTRY = {"services": [
    {"name": "httpbin", "namespace": "default", "instances": [
        {"id": "httpbin-0.default", "address": "10.210.4.3", "ready": True},
        {"id": "httpbin-1.default", "address": "10.210.4.4", "ready": False},
        {"id": "httpbin-2.default", "address": "10.210.4.5", "ready": True}]},
    {"name": "redis", "namespace": "cache", "instances": [
        {"id": "redis-0.cache", "address": "10.210.4.6", "ready": True},
        {"id": "redis-1.cache", "address": "10.210.4.7", "ready": True},
        {"id": "redis-2.cache", "address": "10.210.4.8", "ready": True}]}]}


def test_endpoints_are_ready_instances_at_their_target_port() -> None:
    named = {("cache", "redis-0.cache"): {"redis": 6379}, ("cache", "redis-1.cache"): {"redis": 6380}}
    found = service_endpoints(SERVICES, REGISTRY, named)
    assert found == [
        ServicePortEndpoints("default/httpbin:8000", "10.211.4.10", 8000, ("10.210.4.3:80", "10.210.4.5:80")),
        # redis-2 has no port called "redis": left out, as Kubernetes does.
        ServicePortEndpoints("cache/redis:6379", "10.211.4.11", 6379, ("10.210.4.6:6379", "10.210.4.7:6380")),
    ]


def test_dnat_balances_like_kube_proxy() -> None:
    text = dnat_rules([ServicePortEndpoints("default/web:80", "10.211.4.20", 80,
                                            ("10.210.4.3:8080", "10.210.4.4:8080", "10.210.4.5:8080")),
                       ServicePortEndpoints("default/none:81", "10.211.4.21", 81, ())])
    rules = [line for line in text.splitlines() if line.startswith("-A")]
    assert rules == [
        "-A OUTPUT -j KZ_SERVICES",
        '-A KZ_SERVICES -d 10.211.4.20/32 -p tcp --dport 80 -m comment --comment "default/web:80" -j KZ_SVC_0',
        "-A KZ_SVC_0 -p tcp -m statistic --mode random --probability 0.33333333333 "
        "-j DNAT --to-destination 10.210.4.3:8080",
        "-A KZ_SVC_0 -p tcp -m statistic --mode random --probability 0.50000000000 "
        "-j DNAT --to-destination 10.210.4.4:8080",
        "-A KZ_SVC_0 -p tcp -j DNAT --to-destination 10.210.4.5:8080",
    ]
    assert text.startswith("*nat\n") and text.endswith("COMMIT\n")
