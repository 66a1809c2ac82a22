"""Argparse options generated from the settings dataclasses (``kizuna.runtime.settings``), and back.

A field becomes ``--field-name`` (or a positional), typed from its annotation: ``bool`` is a switch,
``tuple[str, ...]`` takes several values, ``Path``/``float``/``int``/``str`` convert their text. The help text
is the docstring written under the field (read from the class's source); the default shown is the field's.
``settings_from`` rebuilds the frozen dataclass from the parsed namespace, so commands receive settings
objects, never loose attributes.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_CONVERTERS: dict[Any, Any] = {str: str, int: int, float: float, Path: Path}


def add_settings(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one option (or positional) per field of the settings dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(_title(cls))
    for f in dataclasses.fields(cls):
        meta = f.metadata
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"help": docs.get(f.name, ""), "dest": f"{cls.__name__}.{f.name}"}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        base, many = _base_type(hint)
        if base is bool:
            kwargs["action"] = "store_true"
            kwargs.pop("metavar", None)
        else:
            kwargs["type"] = _CONVERTERS[base]
            if many:
                kwargs["nargs"] = meta.get("nargs") or "+"
        if meta.get("positional"):
            group.add_argument(kwargs.pop("dest"), **kwargs)
            continue
        names = [meta.get("flag") or "--" + f.name.replace("_", "-")]
        if meta.get("short"):
            names.insert(0, meta["short"])
        default = _default(f)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        elif base is not bool and default is not None:
            kwargs["help"] += f" (default: {default})"
        # Defaults stay out of the namespace so settings_from can tell "not given" from "given".
        group.add_argument(*names, default=argparse.SUPPRESS, **kwargs)


def settings_from(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build ``cls`` from the options ``add_settings`` added; absent options keep the field's default."""
    values: dict[str, Any] = {}
    given = vars(namespace)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{cls.__name__}.{f.name}"
        if key in given:
            value = given[key]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def field_docs(cls: type[Any]) -> dict[str, str]:
    """The docstring under each field of a class, whitespace collapsed (``{}`` without the source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _title(cls: type[Any]) -> str:
    return cls.__name__.removesuffix("Settings").lower() + " settings"


def _base_type(hint: Any) -> tuple[Any, bool]:
    """``(element type, takes several values)`` of an annotation; ``X | None`` is treated as ``X``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return args[0], True
    if args:
        return _base_type(args[0])
    return hint, False


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
