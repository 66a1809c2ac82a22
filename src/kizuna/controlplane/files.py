"""Writing state files so that a reader, or a restart after a crash, sees the old content or the new, never
half of one: write a temp file in the same directory, then rename it over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ADDRESS_FILE = "controlplane.json"
"""In the state dir: ``{"address": "host:port", "pid": N}`` of the running control plane."""


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` also fsyncs file and directory (survives power
    loss, costs a few milliseconds). Raises OSError; a failed write leaves no temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself is what failed; nothing was left behind
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def atomic_write_json(path: Path, value: Any, durable: bool = True) -> None:
    """``atomic_write`` of indented JSON (non-JSON values, such as dates, written as their text)."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True, default=str).encode() + b"\n", durable)


def read_address_file(state_dir: str | Path) -> dict[str, Any] | None:
    """The running control plane's ``{"address", "pid"}``, or None when there is no (readable) file."""
    try:
        data = json.loads((Path(state_dir) / ADDRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "address" in data else None
