"""The state directory's layout and the runtime's record of what it started (``runtime.json``).

The record is rewritten (atomically) every time a process is spawned, so a ``kizuna up`` that crashes or is
killed half-way still leaves behind everything ``kizuna down`` needs to clean up.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kizuna.proxyconfig.controlplane_tls import TRUST_BUNDLE
from kizuna.runtime.errors import UserError


@dataclass(frozen=True, slots=True)
class StateDir:
    """Paths inside one mesh's state directory (see docs/architecture.md, "State directory")."""

    root: Path

    @property
    def token(self) -> Path:
        return self.root / "token"

    def tracing(self) -> tuple[str | None, float]:
        """Where sidecars export spans (``kizuna up --trace-collector``, else the control plane's OTLP
        receiver when it runs one) and the sampling percent ``kizuna up`` was given."""
        runtime = self.read_runtime() or {}
        endpoint = runtime.get("traceCollector") or (self.read_controlplane() or {}).get("otlp")
        sampling = float(runtime.get("traceSampling", 1.0))
        return (str(endpoint) if endpoint else None), sampling

    def control_plane_ca(self) -> Path | None:
        """The trust bundle sidecars verify the control plane with, when it serves TLS (else None)."""
        data = self.read_controlplane() or {}
        bundle = self.root / TRUST_BUNDLE
        return bundle if data.get("tls") and bundle.is_file() else None

    @property
    def controlplane_json(self) -> Path:
        return self.root / "controlplane.json"

    @property
    def runtime_json(self) -> Path:
        return self.root / "runtime.json"

    @property
    def proxies(self) -> Path:
        return self.root / "proxies"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        """The log file of the process called ``name``."""
        return self.logs / f"{name}.log"

    def bootstrap(self, node_id: str) -> Path:
        """The bootstrap file of the sidecar whose node id is ``node_id``."""
        return self.proxies / f"{node_id}.json"

    def create(self) -> None:
        """Make the directory tree (private: the token lives here)."""
        for path in (self.root, self.proxies, self.logs):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def read_runtime(self) -> dict[str, Any] | None:
        """The runtime record, or None when no mesh was started here (or its record was removed)."""
        try:
            data = json.loads(self.runtime_json.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {self.runtime_json}: {exc}") from exc
        return data if isinstance(data, dict) else None

    def write_runtime(self, data: dict[str, Any]) -> None:
        """Replace the runtime record atomically (write a temporary file, then rename over)."""
        tmp = self.runtime_json.with_name(f".runtime.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.runtime_json)

    def read_controlplane(self) -> dict[str, Any] | None:
        """``controlplane.json`` (address and pid of the running control plane), or None."""
        try:
            data = json.loads(self.controlplane_json.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
