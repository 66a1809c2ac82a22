"""Outlier detection arithmetic: when endpoints are ejected, for how long, and how many at most."""

from __future__ import annotations

from kizuna.proxy.outlier import OutlierDetector
from kizuna.proxyconfig.policy import OutlierDetection

HOSTS = ["a", "b", "c"]


def detector(**config: object) -> OutlierDetector:
    return OutlierDetector(OutlierDetection(**config), HOSTS)  # type: ignore[arg-type]


def fail(d: OutlierDetector, host: str, times: int, now: float, status: int = 503) -> None:
    for _ in range(times):
        d.observe(host, status, now)


def test_five_consecutive_5xx_eject_by_default() -> None:
    d = detector(max_ejection_percent=100)
    fail(d, "a", 4, 0.0)
    assert not d.is_ejected("a", 0.0)
    fail(d, "a", 1, 0.0)
    assert d.is_ejected("a", 0.0) and d.ejected(0.0) == ["a"]
    assert d.ejections_total == 1


def test_a_success_resets_the_count() -> None:
    d = detector(max_ejection_percent=100)
    fail(d, "a", 4, 0.0)
    d.observe("a", 200, 0.0)
    fail(d, "a", 4, 0.0)
    assert not d.is_ejected("a", 0.0)


def test_ejection_time_grows_with_each_ejection_and_decays_when_healthy() -> None:
    d = detector(consecutive_5xx=1, base_ejection_time=1.0, interval=10.0, max_ejection_percent=100)
    fail(d, "a", 1, 0.0)
    assert d.is_ejected("a", 0.99) and not d.is_ejected("a", 1.0)  # back after 1 × base
    fail(d, "a", 1, 1.5)
    assert d.is_ejected("a", 3.4) and not d.is_ejected("a", 3.5)  # second time: 2 × base
    d.sweep(20.0)  # back in (count stays 2)
    d.sweep(30.0)  # each interval of good behaviour lowers the count: 1, then 0
    d.sweep(40.0)
    assert d.hosts["a"].times_ejected == 0
    fail(d, "a", 1, 41.0)
    assert d.is_ejected("a", 41.9) and not d.is_ejected("a", 42.0)  # 1 × base again


def test_max_ejection_percent_default_still_ejects_the_first_of_three() -> None:
    # Envoy: with no host ejected the first outlier is ejected whatever max_ejection_percent (10 %) says;
    # a second one would take the share above it and is skipped.
    d = detector(consecutive_5xx=1)
    fail(d, "a", 1, 0.0)
    fail(d, "b", 1, 0.0)
    assert d.ejected(0.0) == ["a"] and d.ejections_overflow == 1


def test_max_ejection_percent_caps_the_ejected_share() -> None:
    d = detector(consecutive_5xx=1, max_ejection_percent=50)
    fail(d, "a", 1, 0.0)
    fail(d, "b", 1, 0.0)
    assert d.ejected(0.0) == ["a"]
    d100 = detector(consecutive_5xx=1, max_ejection_percent=100)
    for host in HOSTS:
        fail(d100, host, 1, 0.0)
    assert sorted(d100.ejected(0.0)) == HOSTS  # type: ignore[type-var]


def test_gateway_errors_count_only_502_to_504() -> None:
    d = detector(consecutive_5xx=0, consecutive_gateway=2, max_ejection_percent=100)
    fail(d, "a", 3, 0.0, status=500)
    assert not d.is_ejected("a", 0.0)
    fail(d, "a", 2, 0.0, status=502)
    assert d.is_ejected("a", 0.0)


def test_panic_below_min_health_percent() -> None:
    d = detector(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=50)
    fail(d, "a", 1, 0.0)
    assert not d.panic(0.0)  # 2 of 3 healthy
    fail(d, "b", 1, 0.0)
    assert d.panic(0.0)  # 1 of 3 healthy < 50 %
    assert not detector(consecutive_5xx=1).panic(0.0)


def test_unknown_hosts_are_ignored_and_stats_report() -> None:
    d = detector(consecutive_5xx=1, max_ejection_percent=100)
    d.observe("zzz", 503, 0.0)
    fail(d, "b", 1, 0.0)
    assert d.to_json(0.0) == {"ejections_total": 1, "ejections_active": 1, "ejections_overflow": 0}
