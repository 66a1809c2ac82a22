"""Which answers a route's retry policy retries (``RetryRules``) and how long it waits between tries."""

from __future__ import annotations

import pytest

from kizuna.api.virtualservice import HTTPRetry
from kizuna.controlplane.compile_routes import retry_policy
from kizuna.proxy.retry import RetryRules, backoff
from kizuna.proxyconfig.model import RetryPolicy


def rules(retry_on: str, attempts: int = 2) -> RetryRules:
    return RetryRules(retry_policy(HTTPRetry.model_validate({"attempts": attempts, "retryOn": retry_on})))


def test_retriable_4xx_retries_conflict_only() -> None:
    r = rules("retriable-4xx")
    assert r.retriable_statuses == {409}
    assert not r.on_reset and not r.on_connect_failure


def test_istio_default_retries_503_and_connect_failures_not_409() -> None:
    r = RetryRules(RetryPolicy())
    assert r.retriable_statuses == {503}
    assert r.on_connect_failure and not r.on_reset


def test_numeric_retry_on_entries_are_retriable_status_codes() -> None:
    r = rules("connect-failure,502,429")
    assert r.retriable_statuses == {429, 502}
    assert r.on_connect_failure and not r.on_timeout  # no 504 among the codes: a per-try timeout is final
    assert rules("gateway-error,retriable-4xx").retriable_statuses == {409, 502, 503, 504}
    assert rules("5xx").retriable_statuses == set(range(500, 600))


@pytest.mark.parametrize(("retry", "low", "high"), [(1, 0.025, 0.05), (2, 0.05, 0.1), (3, 0.1, 0.2),
                                                    (4, 0.125, 0.25), (9, 0.125, 0.25), (40, 0.125, 0.25)])
def test_backoff_grows_from_25ms_with_jitter_up_to_250ms(retry: int, low: float, high: float) -> None:
    delays = [backoff(retry) for _ in range(300)]
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 250  # jittered, not one fixed delay
    assert max(delays) - min(delays) > (high - low) / 2
