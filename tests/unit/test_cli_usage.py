"""The command line's contract: usage errors exit 2, --help works everywhere, kinds resolve as kubectl's do,
and the options of process commands come from the settings dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from kizuna.cli.kinds import plural, resolve_kind
from kizuna.cli.main import build_parser, main
from kizuna.cli.options import field_docs, settings_from
from kizuna.runtime.errors import UserError
from kizuna.runtime.settings import (
    STATE_DIR_ENV,
    ControlPlaneSettings,
    DownSettings,
    ProxySettings,
    StateSettings,
    UpSettings,
)

SUBCOMMANDS = ["up", "down", "apply", "delete", "get", "validate", "status", "exec", "controlplane", "proxy",
               "rotate-root", "traces"]


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["up"],  # PATH is required
    ["apply"],  # -f is required
    ["delete", "x.yaml"],
    ["validate"],
    ["get"],  # KIND is required
    ["get", "vs", "-o", "xml"],
    ["up", "x.yaml", "--ready-timeout", "soon"],
    ["up", "x.yaml", "--no-such-flag"],
    ["exec", "sleep"],  # no command
    ["exec", "sleep", "--"],
    ["proxy"],  # --bootstrap is required
    ["status", "extra"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: kizuna" in capsys.readouterr().err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: kizuna {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out


@pytest.mark.parametrize("settings", [StateSettings, UpSettings, DownSettings, ControlPlaneSettings,
                                      ProxySettings])
def test_every_setting_is_an_option_with_its_help(settings: type, capsys: pytest.CaptureFixture[str]) -> None:
    command = {UpSettings: "up", DownSettings: "down", ControlPlaneSettings: "controlplane",
               ProxySettings: "proxy", StateSettings: "status"}[settings]
    main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(settings)
    for field in dataclasses.fields(settings):
        assert len(docs[field.name]) > 20  # every field is documented...
        assert docs[field.name] in text  # ...and that text is its --help
        if not field.metadata.get("positional"):
            assert "--" + field.name.replace("_", "-") in text


def test_settings_are_built_from_arguments_with_field_defaults() -> None:
    args = build_parser().parse_args(["up", "a.yaml", "b/", "--detach", "--pod-cidr", "127.40.2.0/24"])
    assert settings_from(UpSettings, args) == UpSettings(paths=("a.yaml", "b/"), detach=True,
                                                         pod_cidr="127.40.2.0/24")
    args = build_parser().parse_args(["up", "a.yaml"])
    assert settings_from(UpSettings, args) == UpSettings(paths=("a.yaml",))
    args = build_parser().parse_args(["proxy", "--bootstrap", "b.json"])
    assert settings_from(ProxySettings, args) == ProxySettings(bootstrap=Path("b.json"))
    args = build_parser().parse_args(["controlplane", "--listen", "127.0.0.1:1", "--state-dir", "/x"])
    assert settings_from(ControlPlaneSettings, args).listen == "127.0.0.1:1"
    assert settings_from(StateSettings, args).resolved() == Path("/x")


def test_state_dir_comes_from_flag_then_environment_then_default(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert StateSettings().resolved() == tmp_path / ".kizuna"
    monkeypatch.setenv(STATE_DIR_ENV, "from-env")
    assert StateSettings().resolved() == tmp_path / "from-env"
    assert StateSettings(Path("/flag")).resolved() == Path("/flag")


@pytest.mark.parametrize(("text", "kind"), [
    ("vs", "VirtualService"), ("VS", "VirtualService"), ("virtualservice", "VirtualService"),
    ("virtualservices", "VirtualService"), ("VirtualService", "VirtualService"),
    ("virtualservices.networking.istio.io", "VirtualService"),
    ("dr", "DestinationRule"), ("destinationrules", "DestinationRule"),
    ("deploy", "Deployment"), ("deployments", "Deployment"), ("Deployment", "Deployment"),
    ("svc", "Service"), ("services", "Service"), ("service", "Service"),
    ("sa", "ServiceAccount"), ("serviceaccounts", "ServiceAccount"),
])
def test_kind_aliases(text: str, kind: str) -> None:
    assert resolve_kind(text) == kind


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown resource kind 'vss'; known kinds: .*VirtualService"):
        resolve_kind("vss")
    with pytest.raises(UserError):
        resolve_kind("gw", ["VirtualService", "Service"])  # a kind this build does not support


def test_plurals() -> None:
    assert plural("AuthorizationPolicy") == "authorizationpolicies"
    assert plural("Gateway") == "gateways"
    assert plural("Ingress") == "ingresses"
    assert plural("Service") == "services"


def test_commands_needing_a_mesh_say_none_is_running(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "nothing")
    for argv in (["status"], ["get", "vs"], ["exec", "sleep", "--", "true"]):
        assert main([argv[0], "--state-dir", state, *argv[1:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"kizuna: no mesh is running in {state}") and err.count("\n") == 1, err
    assert main(["down", "--state-dir", state]) == 0
    assert "no mesh is running" in capsys.readouterr().out


def test_get_rejects_unknown_kinds_before_contacting_anything(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "frobnicators", "--state-dir", str(tmp_path)]) == 1
    assert "kizuna: unknown resource kind 'frobnicators'" in capsys.readouterr().err


@pytest.mark.integration
def test_sidecar_entry_point_loads_no_control_plane_pydantic_or_yaml(tmp_path: Path) -> None:
    # One `kizuna proxy` runs per instance: its import graph must stay the data plane's.
    probe = ("import sys\n"
             "from kizuna.cli.main import main\n"
             f"code = main(['proxy', '--bootstrap', {str(tmp_path / 'absent.json')!r}])\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml')\n"
             "               or m.startswith(('kizuna.api', 'kizuna.controlplane', 'kizuna.runtime.up')))\n"
             "print(code, heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout == "2 []\n", result.stderr
    assert "cannot read bootstrap" in result.stderr
