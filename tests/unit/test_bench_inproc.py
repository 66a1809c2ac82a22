"""The in-process hot-path benchmark still drives the real proxy classes end to end."""

from __future__ import annotations

from bench import inproc


def test_inproc_benchmark_answers_every_request_on_one_pooled_connection() -> None:
    # run() itself checks that every request produced exactly one 200 response downstream, and its
    # transport refuses to be closed: a change that breaks connection reuse or the response makes it raise.
    cost = inproc.run(requests=300, rounds=2)
    assert 0 < cost < 10_000
