"""YAML/JSON in, plain documents out (and back out for ``kizuna get -o yaml|json``).

Reading is strict where Kubernetes is strict: a duplicate key in a mapping is an error (PyYAML would
silently keep the last one, hiding a second ``http:`` block), and timestamps stay strings as in Kubernetes.
Syntax errors name the file and line: ``vs.yaml:7: mapping values are not allowed here``.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kizuna.api.errors import ValidationError

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Document:
    """One YAML document: where it came from (file as given, 0-based index in the file) and its mapping."""

    source: str
    index: int
    raw: dict[str, Any]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and keeps timestamps as strings (as Kubernetes does)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_text(text: str, source: str) -> list[Document]:
    """Split YAML (or JSON) text into documents, skipping empty ones. Raises ValidationError on bad syntax.

    A Kubernetes ``kind: List`` (what ``kizuna get -o json`` prints for several resources) stands for its
    ``items``; ``Document.index`` counts the resulting documents.
    """
    docs: list[Document] = []
    errors: list[str] = []
    if source.endswith(".json"):
        try:
            loaded: list[Any] = [json.loads(text)] if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ValidationError([f"{source}:{exc.lineno}: {exc.msg}"]) from None
    else:
        try:
            loaded = list(yaml.load_all(text, Loader=_StrictLoader))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = exc.problem or exc.context or "invalid YAML"
            raise ValidationError([f"{source}{line}: {problem}"]) from None
        except yaml.YAMLError as exc:  # not position-aware (rare: e.g. reader errors on bad bytes)
            raise ValidationError([f"{source}: {exc}"]) from None
    flat: list[Any] = []
    for value in loaded:
        if isinstance(value, dict) and value.get("kind") == "List" and isinstance(value.get("items"), list):
            flat.extend(value["items"])
        else:
            flat.append(value)
    for index, value in enumerate(flat):
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.append(f"{source}: document {index + 1}: must be a mapping with apiVersion, kind, "
                          f"metadata and spec (got {type(value).__name__})")
            continue
        docs.append(Document(source, index, value))
    if errors:
        raise ValidationError(errors)
    return docs


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    return [path]


def load_documents(paths: Sequence[str | Path]) -> list[Document]:
    """Read files and directories (recursively, ``*.yaml|*.yml|*.json``, sorted) into documents, in order.

    All files are read before failing, so one ValidationError lists every syntax error.
    """
    docs: list[Document] = []
    errors: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            errors.append(f"{given}: no such file or directory")
            continue
        for file in _files(path):
            source = str(given) if file == path else str(file)
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(f"{source}: cannot read: {exc}")
                continue
            try:
                docs.extend(parse_text(text, source))
            except ValidationError as exc:
                errors.extend(exc.errors)
    if errors:
        raise ValidationError(errors)
    return docs


def dump_yaml(raw: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """YAML text of one resource, or of several separated by ``---``; keys keep their original order."""
    items = [raw] if isinstance(raw, dict) else list(raw)
    return "---\n".join(yaml.safe_dump(item, sort_keys=False, default_flow_style=False) for item in items)


def dump_json(raw: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Indented JSON of one resource, or a Kubernetes-style ``List`` of several."""
    value: Any = raw if isinstance(raw, dict) else {"apiVersion": "v1", "kind": "List", "items": list(raw)}
    return json.dumps(value, indent=2) + "\n"
