"""Transparent mode's host-side plan: mesh names, address ranges and the mode choice."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kizuna.runtime import modes
from kizuna.runtime.errors import UserError
from kizuna.runtime.netns import POD_BLOCK, Names, choose_range, mesh_id, parse_range

Net = ipaddress.IPv4Network


def test_names_fit_linux_interface_names() -> None:
    names = Names(mesh_id(Path("/home/me/project/.kizuna")))
    assert len(names.mesh) == 6 and int(names.mesh, 16) >= 0
    for name in (names.bridge, names.veth(999), names.peer(999)):
        assert len(name) <= 15  # IFNAMSIZ - 1
    assert names.netns(3) == f"kz{names.mesh}-3"
    assert mesh_id("/a/.kizuna") != mesh_id("/b/.kizuna")


def test_range_is_stable_per_state_dir_and_skips_networks_in_use() -> None:
    first = choose_range("/a/.kizuna", POD_BLOCK, [])
    assert first == choose_range("/a/.kizuna", POD_BLOCK, [])
    assert first.prefixlen == 24 and first.subnet_of(POD_BLOCK)
    # A route or address overlapping the preferred block pushes the choice to the next free /24.
    moved = choose_range("/a/.kizuna", POD_BLOCK, [Net(f"{first.network_address}/25")])
    assert moved != first and moved.subnet_of(POD_BLOCK)
    assert choose_range("/a/.kizuna", POD_BLOCK, [Net("0.0.0.0/0")]) == first  # a default route is no clash
    with pytest.raises(UserError):
        choose_range("/a/.kizuna", POD_BLOCK, [Net("10.210.0.0/16")])


@pytest.mark.parametrize(("text", "problem"), [
    ("127.40.0.0/24", "must be a private, non-loopback range"),
    ("8.8.8.0/24", "must be a private, non-loopback range"),
    ("10.9.0.0/30", "use a /16 to /29"),
    ("10.9.0.0/40", "--pod-cidr 10.9.0.0/40:"),
])
def test_bad_transparent_ranges(text: str, problem: str) -> None:
    with pytest.raises(UserError) as info:
        parse_range(text, "--pod-cidr")
    assert problem in info.value.lines[0]


def test_mode_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modes, "missing_capability", lambda: None)
    assert modes.resolve_mode("auto", None) == ("transparent", None)
    assert modes.resolve_mode("auto", "127.40.1.0/24") == ("proxy", None)  # a loopback range: proxy mode's
    assert modes.resolve_mode("auto", "10.220.1.0/24") == ("transparent", None)  # the namespaces' range
    assert modes.resolve_mode("proxy", None) == ("proxy", None)
    monkeypatch.setattr(modes, "missing_capability", lambda: "transparent mode needs root")
    assert modes.resolve_mode("auto", None) == ("proxy", "kizuna: using proxy mode: transparent mode needs root")
    with pytest.raises(UserError, match="needs root"):
        modes.resolve_mode("transparent", None)
    with pytest.raises(UserError, match="10.220.1.0/24 is a range for network namespaces: .*needs root"):
        modes.resolve_mode("auto", "10.220.1.0/24")
    with pytest.raises(UserError, match="choose one of auto, transparent, proxy"):
        modes.resolve_mode("magic", None)
