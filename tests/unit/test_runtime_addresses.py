"""The loopback address plan: pod/mesh pairs, --pod-cidr checks, and choosing a free /24."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from kizuna.runtime.addresses import (
    DEFAULT_BLOCK,
    PodRange,
    choose_pod_range,
    listeners_in,
    listening_addresses,
    parse_pod_cidr,
)
from kizuna.runtime.errors import UserError


def test_instances_get_consecutive_pod_and_mesh_addresses() -> None:
    pod_range = parse_pod_cidr("127.40.7.0/24")
    assert pod_range.control_plane_address == "127.40.7.1"
    assert pod_range.instance_addresses(0) == ("127.40.7.2", "127.40.7.3")
    assert pod_range.instance_addresses(1) == ("127.40.7.4", "127.40.7.5")
    assert pod_range.capacity == 126
    assert pod_range.instance_addresses(125) == ("127.40.7.252", "127.40.7.253")
    with pytest.raises(UserError, match="room for 126 instances"):
        pod_range.instance_addresses(126)


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.0/24", "must be inside 127.0.0.0/8"),
    ("127.40.0.0/30", "too small"),
    ("not-a-cidr", "--pod-cidr not-a-cidr"),
    ("127.40.0.0/33", "--pod-cidr 127.40.0.0/33"),
])
def test_bad_pod_cidr_is_a_user_error(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_pod_cidr(text)


def test_pod_cidr_host_bits_are_tolerated() -> None:
    assert str(parse_pod_cidr("127.40.3.9/24")) == "127.40.3.0/24"


def test_choice_is_stable_per_seed_and_differs_between_state_dirs() -> None:
    a1 = choose_pod_range("/home/me/project-a/.kizuna", listening={})
    a2 = choose_pod_range("/home/me/project-a/.kizuna", listening={})
    b = choose_pod_range("/home/me/project-b/.kizuna", listening={})
    assert a1 == a2
    assert a1 != b
    for chosen in (a1, b):
        assert chosen.network.prefixlen == 24 and chosen.network.subnet_of(DEFAULT_BLOCK)


def test_choice_skips_blocks_where_something_listens() -> None:
    seed = "/srv/x/.kizuna"
    first = choose_pod_range(seed, listening={})
    busy = {first.network[3]: [8080]}
    second = choose_pod_range(seed, listening=busy)
    assert second != first
    # wildcard listeners (0.0.0.0) are not in any block and do not count
    assert choose_pod_range(seed, listening={ipaddress.IPv4Address("0.0.0.0"): [22]}) == first


def test_every_block_busy_is_a_user_error() -> None:
    block = ipaddress.IPv4Network("127.41.0.0/23")
    busy = {ipaddress.IPv4Address("127.41.0.9"): [1], ipaddress.IPv4Address("127.41.1.9"): [1]}
    with pytest.raises(UserError, match="no free /24"):
        choose_pod_range("s", block=block, listening=busy)


def test_real_listening_socket_is_seen_in_proc_net_tcp() -> None:
    with socket.socket() as server:
        server.bind(("127.40.251.7", 0))
        server.listen()
        port = server.getsockname()[1]
        found = listening_addresses()
        assert port in found[ipaddress.IPv4Address("127.40.251.7")]
        assert listeners_in(PodRange(ipaddress.IPv4Network("127.40.251.0/24"))) == [f"127.40.251.7:{port}"]
        assert choose_pod_range("x", block=ipaddress.IPv4Network("127.40.251.0/24"), prefix=25) == \
            PodRange(ipaddress.IPv4Network("127.40.251.128/25"))
    assert listeners_in(PodRange(ipaddress.IPv4Network("127.40.251.0/24"))) == []


def test_proc_file_missing_means_nothing_listens(tmp_path: Path) -> None:
    assert listening_addresses(tmp_path / "absent") == {}
