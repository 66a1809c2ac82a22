"""istio-iptables equivalence: kizuna's capture rules against Istio's golden files (MESH-FACTS §4.2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from kizuna.runtime.capture import (
    CaptureSpec,
    apply_rules,
    capture_rules,
    sidecar_injected,
    spec_from_annotations,
)
from kizuna.runtime.errors import UserError

# Istio's tools/istio-iptables/pkg/capture/testdata/inbound-ports-wildcard.golden and outbound-ports-exclude
# .golden share this OUTPUT part; ISTIO_ chains are KZ_ here.
ISTIO_OUTPUT_OWNER_RULES = [
    "-A KZ_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "-A KZ_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j KZ_IN_REDIRECT",
    "-A KZ_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A KZ_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A KZ_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j KZ_IN_REDIRECT",
    "-A KZ_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A KZ_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A KZ_OUTPUT -d 127.0.0.1/32 -j RETURN",
]


def rules(spec: CaptureSpec) -> list[str]:
    return [line for line in capture_rules(spec).splitlines() if line.startswith("-A")]


def test_default_sidecar_matches_istio_init() -> None:
    # istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
    # (+ kizuna's admin port 15000, which the host reaches on the pod address).
    assert rules(CaptureSpec()) == [
        "-A KZ_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A KZ_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A KZ_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j KZ_INBOUND",
        "-A KZ_INBOUND -p tcp --dport 15000 -j RETURN",
        "-A KZ_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A KZ_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A KZ_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A KZ_INBOUND -p tcp -j KZ_IN_REDIRECT",
        "-A OUTPUT -p tcp -j KZ_OUTPUT",
        *ISTIO_OUTPUT_OWNER_RULES,
        "-A KZ_OUTPUT -j KZ_REDIRECT",
    ]


def test_included_inbound_ports_as_istio_inbound_ports_include_golden() -> None:
    spec = spec_from_annotations({"traffic.sidecar.istio.io/includeInboundPorts": "32000,31000",
                                  "traffic.sidecar.istio.io/includeOutboundIPRanges": ""})
    assert rules(spec) == [
        "-A KZ_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A KZ_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A KZ_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j KZ_INBOUND",
        "-A KZ_INBOUND -p tcp --dport 32000 -j KZ_IN_REDIRECT",
        "-A KZ_INBOUND -p tcp --dport 31000 -j KZ_IN_REDIRECT",
        "-A OUTPUT -p tcp -j KZ_OUTPUT",
        *ISTIO_OUTPUT_OWNER_RULES,
    ]


def test_outbound_annotations_as_istio_ip_range_and_ports_exclude_goldens() -> None:
    spec = spec_from_annotations({
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "9.9.0.0/16",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "1.1.0.0/16",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "22,80,443",
        "traffic.sidecar.istio.io/excludeInboundPorts": "8081"})
    out = rules(spec)
    assert out[out.index("-A OUTPUT -p tcp -j KZ_OUTPUT") + 1] == \
        "-A KZ_OUTPUT -p tcp -m multiport --dports 22,80,443 -j RETURN"
    assert out[-4:] == ["-A KZ_OUTPUT -d 127.0.0.1/32 -j RETURN", "-A KZ_OUTPUT -d 1.1.0.0/16 -j RETURN",
                        "-A KZ_OUTPUT -d 9.9.0.0/16 -j KZ_REDIRECT", "-A KZ_OUTPUT -j RETURN"]
    assert "-A KZ_INBOUND -p tcp --dport 8081 -j RETURN" in out


def test_control_plane_address_is_never_captured() -> None:
    spec = spec_from_annotations({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"},
                                 always_excluded=["10.210.4.1/32"])
    assert spec.exclude_outbound == ("10.0.0.0/8", "10.210.4.1/32")
    assert rules(spec)[-2] == "-A KZ_OUTPUT -d 10.210.4.1/32 -j RETURN"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("excludeOutboundIPRanges", "10.0.0.0/33", "annotation traffic.sidecar.istio.io/excludeOutboundIPRanges: "
                                              "'10.0.0.0/33' is not an IPv4 CIDR"),
    ("excludeInboundPorts", "80,http", "annotation traffic.sidecar.istio.io/excludeInboundPorts: 'http' is not "
                                       "a port number"),
])
def test_bad_annotations_name_the_annotation(key: str, value: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        spec_from_annotations({f"traffic.sidecar.istio.io/{key}": value})
    assert str(info.value.lines[0]).startswith(message)


def test_inject_false_turns_the_sidecar_off() -> None:
    assert sidecar_injected({})
    assert sidecar_injected({"sidecar.istio.io/inject": "true"})
    assert not sidecar_injected({"sidecar.istio.io/inject": "false"})
    assert not sidecar_injected({"sidecar.istio.io/inject": "False"})


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("iptables-restore")):
        pytest.skip("needs root, ip and iptables (network namespaces)")
    name = f"kztest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_the_kernel_accepts_the_rules(scratch_netns: str) -> None:
    spec = spec_from_annotations({"traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
                                  "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8"})
    apply_rules(scratch_netns, capture_rules(spec))
    saved = subprocess.run(["ip", "netns", "exec", scratch_netns, "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    # iptables-save prints options in its own order.
    assert "-A KZ_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN" in saved
    assert "-A KZ_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN" in saved
    assert "-A KZ_OUTPUT -d 10.0.0.0/8 -j KZ_REDIRECT" in saved
    assert "-A KZ_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in saved
    assert saved.count("-j KZ_IN_REDIRECT") == 3  # catch-all inbound + the two self-call rules
