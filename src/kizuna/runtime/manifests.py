"""Reading manifests for the runtime and the CLI: files and directories in, documents and resources out.

Directories are read the way ``kubectl apply -f DIR`` reads them: the ``*.yaml``, ``*.yml`` and ``*.json``
files directly inside, in name order, and subdirectories only when asked (``-R``). So ``kizuna up
examples/httpbin`` starts the workloads and leaves ``examples/httpbin/networking/`` for later ``apply`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kizuna.api import Document, load_documents, parse_all
from kizuna.api.codec import SUFFIXES
from kizuna.runtime.errors import UserError


def manifest_paths(paths: Sequence[str], recursive: bool = False) -> list[str]:
    """``paths`` with each directory replaced by the manifest files it holds (all levels if ``recursive``)."""
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir() and not recursive:
            out.extend(str(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix in SUFFIXES)
        else:
            out.append(given)
    return out


def load(paths: Sequence[str], recursive: bool = False, unique: bool = True) -> tuple[list[Document], list[Any]]:
    """Read and validate offline: ``(documents, resources)``; raises ValidationError listing every problem.

    ``unique=False`` accepts the same resource in several files (alternatives, as in Istio's samples)."""
    documents = load_documents(manifest_paths(paths, recursive))
    if not documents:
        raise UserError(f"no manifests (*.yaml, *.yml, *.json) in {', '.join(paths)}")
    return documents, list(parse_all(documents, unique=unique))
