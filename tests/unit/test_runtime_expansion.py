"""Kubernetes $(VAR) expansion: the cases of the kubelet's own expansion tests."""

from __future__ import annotations

import pytest

from kizuna.runtime.expansion import expand

VARS = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": "",
        "POD_IP": "127.40.0.2"}


@pytest.mark.parametrize(("text", "expected"), [
    ("$(VAR_A)", "A"),
    ("___$(VAR_B)___", "___B___"),
    ("$(VAR_A)-$(VAR_A)", "A-A"),
    ("$(VAR_A)$(VAR_B)$(VAR_C)", "ABC"),
    ("$(POD_IP):8080", "127.40.0.2:8080"),
    ("$(VAR_EMPTY)x", "x"),
    # a value is not expanded again
    ("$(VAR_REF)", "$(VAR_A)"),
    # unknown references stay literally
    ("$(UNKNOWN)", "$(UNKNOWN)"),
    ("$(VAR_A)$(UNKNOWN)", "A$(UNKNOWN)"),
    # $$ escapes
    ("$$(VAR_A)", "$(VAR_A)"),
    ("$$$(VAR_A)", "$A"),
    ("$$$$(VAR_A)", "$$(VAR_A)"),
    ("f000-$$VAR_A", "f000-$VAR_A"),
    ("$$", "$"),
    # a lone or unterminated operator is kept
    ("$", "$"),
    ("foo$", "foo$"),
    ("$VAR_A", "$VAR_A"),
    ("$(VAR_A", "$(VAR_A"),
    ("$()", "$()"),
    ("$(VAR_A)$(", "A$("),
    ("no variables", "no variables"),
    ("", ""),
])
def test_expand_follows_kubelet_rules(text: str, expected: str) -> None:
    assert expand(text, VARS) == expected
