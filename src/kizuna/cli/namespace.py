"""``kizuna apply -n NS`` / ``kizuna delete -n NS``: the namespace given on the command line, as kubectl uses it.

A document without ``metadata.namespace`` takes the one given (Istio's task pages apply namespace-less YAML with
``kubectl apply -n foo``); a document naming the same namespace keeps it; a document naming another one is an
error, with kubectl's own wording, since silently moving it or silently ignoring ``-n`` would both surprise.
"""

from __future__ import annotations

from collections.abc import Iterable

from kizuna.api import Document
from kizuna.runtime.errors import UserError


def with_namespace(documents: Iterable[Document], namespace: str | None) -> list[Document]:
    """``documents`` with ``namespace`` filled in where they name none; raises UserError (every mismatch, one
    line each) when a document names a different namespace. ``None``: the documents unchanged."""
    documents = list(documents)
    if namespace is None:
        return documents
    out: list[Document] = []
    problems: list[str] = []
    for doc in documents:
        meta = doc.raw.get("metadata")
        if not isinstance(meta, dict):
            out.append(doc)  # validation reports the missing metadata
            continue
        given = meta.get("namespace")
        if given and given != namespace:
            what = f"{doc.raw.get('kind', '?')} {meta.get('name', '?')}"
            problems.append(f"{doc.source}: {what}: the namespace from the provided object \"{given}\" does not "
                            f"match the namespace \"{namespace}\". You must pass '--namespace={given}' to "
                            "perform this operation.")
            continue
        if given:
            out.append(doc)
        else:
            out.append(Document(doc.source, doc.index, {**doc.raw, "metadata": {**meta, "namespace": namespace}}))
    if problems:
        raise UserError(*problems)
    return out
