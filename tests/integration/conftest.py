"""Fixtures shared by the data-plane integration tests: one event loop per module, sidecars cleaned up per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kizuna.testing.mesh import BackgroundLoop, LocalMesh


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture
def mesh(bg: BackgroundLoop) -> Iterator[LocalMesh]:
    m = LocalMesh(bg)
    try:
        yield m
    finally:
        m.close()
