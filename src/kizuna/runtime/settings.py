"""Process settings of the local runtime, one frozen dataclass per group, one help text per field.

The CLI is generated from these classes (``kizuna.cli.main``): a field's metadata says which flag sets it, and
its ``help`` is the field's documentation, so the option list and the defaults live in exactly one place.
Process *settings* are not mesh *resources*: nothing here is ever sent to the control plane.

This module is imported by every ``kizuna`` process, sidecars included, so it imports only the stdlib.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "KIZUNA_STATE_DIR"
DEFAULT_STATE_DIR = ".kizuna"
CONTROL_PLANE_PORT = 15010
"""istiod's plaintext discovery port; the runtime's control plane listens on it at the pod range's first address."""


def setting(default: Any = MISSING, *, help: str, flag: str | None = None, short: str | None = None,
            positional: bool = False, nargs: str | None = None, metavar: str | None = None,
            env: str | None = None) -> Any:
    """Declare one setting: its default and its documentation, plus how the CLI spells it.

    ``flag`` defaults to ``--<field-name-with-dashes>``; ``positional`` makes it an argument instead; ``env``
    names an environment variable consulted when the flag is absent.
    """
    meta = {"help": help, "flag": flag, "short": short, "positional": positional, "nargs": nargs,
            "metavar": metavar, "env": env}
    if isinstance(default, list | dict):
        frozen = tuple(default) if isinstance(default, list) else default
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where a mesh keeps its state; every command that talks to a mesh finds it through this directory."""

    state_dir: Path | None = setting(
        None, env=STATE_DIR_ENV, metavar="DIR",
        help=f"state directory of the mesh (default: ${STATE_DIR_ENV}, else ./{DEFAULT_STATE_DIR})")

    def resolved(self) -> Path:
        """The state directory as an absolute path: the flag, else the environment, else ``./.kizuna``."""
        chosen = self.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
        return Path(chosen).expanduser().absolute()


@dataclass(frozen=True, slots=True)
class UpSettings:
    """``kizuna up``: start a control plane, apply manifests, run every Deployment with a sidecar."""

    paths: tuple[str, ...] = setting(
        [], positional=True, nargs="+", metavar="PATH",
        help="manifest files, or directories whose *.yaml/*.yml files are applied (not recursive)")
    detach: bool = setting(False, help="return once every instance is ready; stop the mesh with `kizuna down`")
    pod_cidr: str | None = setting(
        None, metavar="CIDR",
        help="loopback block for pod and mesh addresses, e.g. 127.40.1.0/24 "
             "(default: a free /24 in 127.10.0.0/16 where nothing listens)")
    ready_timeout: float = setting(
        60.0, metavar="SECONDS", help="how long to wait for every instance to become ready")
    stop_grace: float = setting(
        5.0, metavar="SECONDS", help="on stop, how long processes get after SIGTERM before SIGKILL")


@dataclass(frozen=True, slots=True)
class DownSettings:
    """``kizuna down``: stop every process of the mesh in the state directory."""

    stop_grace: float = setting(
        5.0, metavar="SECONDS", help="how long processes get after SIGTERM before SIGKILL")


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """``kizuna controlplane``: the control plane process (started by ``kizuna up``, or by hand to restart it)."""

    listen: str | None = setting(
        None, metavar="HOST:PORT",
        help="address to serve the API and discovery on (default: the address recorded in the state "
             "directory's controlplane.json, so running sidecars find a restarted control plane; else "
             "127.0.0.1:0)")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """``kizuna proxy``: one sidecar process."""

    bootstrap: Path = setting(metavar="FILE", help="the sidecar's bootstrap JSON (written by `kizuna up`)")
