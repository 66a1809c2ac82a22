"""Kubernetes ``$(VAR)`` expansion, as the kubelet applies it to ``env`` values, ``command`` and ``args``.

Rules (k8s.io/kubernetes third_party/forked/golang/expansion): ``$(NAME)`` becomes the variable's value when
``NAME`` is defined, and stays literally ``$(NAME)`` when it is not; ``$$`` is an escaped ``$`` (so
``$$(NAME)`` yields the text ``$(NAME)``); any other ``$`` and an unterminated ``$(`` are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

_OPERATOR = "$"
_OPENER = "("
_CLOSER = ")"


def expand(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with every ``$(NAME)`` reference to a defined variable replaced by its value."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == _OPERATOR and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, is_reference, advance = _read_reference(text, cursor + 1)
            if is_reference:
                out.append(variables.get(read, f"{_OPERATOR}{_OPENER}{read}{_CLOSER}"))
            else:
                out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def _read_reference(text: str, start: int) -> tuple[str, bool, int]:
    """What follows a ``$`` at ``start - 1``: ``(text read, is it a reference name, characters consumed)``."""
    first = text[start]
    if first == _OPERATOR:
        return _OPERATOR, False, 1
    if first == _OPENER:
        closer = text.find(_CLOSER, start + 1)
        if closer >= 0:
            return text[start + 1:closer], True, closer - start + 1
        return _OPERATOR + _OPENER, False, 1
    return _OPERATOR + first, False, 1
