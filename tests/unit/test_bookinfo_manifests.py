"""examples/bookinfo's manifests say what Istio's Bookinfo samples say: the same Services, ServiceAccounts and
Deployments (names, labels, ports, service accounts), networking files whose specs equal Istio's, and a
default set for ``kizuna up examples/bookinfo`` of the app, the gateway and the destination rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kizuna.api import load_documents, parse_all
from kizuna.runtime.manifests import load
from kizuna.testing.samples import ISTIO_SAMPLES

BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
OURS = BOOKINFO / "networking"
ISTIO = ISTIO_SAMPLES / "samples" / "bookinfo"
TASK = ISTIO_SAMPLES / "tasks" / "request-timeouts"

pytestmark = pytest.mark.skipif(not ISTIO.is_dir(), reason="Istio sample corpus not present")

SAME_AS_ISTIO = {
    "bookinfo-gateway.yaml": ISTIO / "networking/bookinfo-gateway.yaml",
    "destination-rule-all.yaml": ISTIO / "networking/destination-rule-all.yaml",
    "destination-rule-all-mtls.yaml": ISTIO / "networking/destination-rule-all-mtls.yaml",
    "virtual-service-all-v1.yaml": ISTIO / "networking/virtual-service-all-v1.yaml",
    "virtual-service-reviews-test-v2.yaml": ISTIO / "networking/virtual-service-reviews-test-v2.yaml",
    "virtual-service-reviews-50-v3.yaml": ISTIO / "networking/virtual-service-reviews-50-v3.yaml",
    "virtual-service-reviews-v3.yaml": ISTIO / "networking/virtual-service-reviews-v3.yaml",
    "virtual-service-reviews-jason-v2-v3.yaml": ISTIO / "networking/virtual-service-reviews-jason-v2-v3.yaml",
    "virtual-service-ratings-test-delay.yaml": ISTIO / "networking/virtual-service-ratings-test-delay.yaml",
    "virtual-service-ratings-test-abort.yaml": ISTIO / "networking/virtual-service-ratings-test-abort.yaml",
    "virtual-service-reviews-v2.yaml": TASK / "01-virtualservice-reviews-v2.yaml",
    "virtual-service-reviews-v2-timeout.yaml": TASK / "03-virtualservice-reviews-v2-timeout.yaml",
}


def _specs(path: Path) -> dict[tuple[str, str], Any]:
    return {(r.kind, r.name): r.spec for r in parse_all(load_documents([path]))}


@pytest.mark.parametrize("ours", sorted(SAME_AS_ISTIO), ids=str)
def test_our_networking_file_has_istios_specs(ours: str) -> None:
    assert _specs(OURS / ours) == _specs(SAME_AS_ISTIO[ours])


def test_our_2s_ratings_delay_is_the_tasks_with_the_current_field() -> None:
    # The task's YAML uses the deprecated `percent: 100`; ours says `percentage: {value: 100}`.
    key = ("VirtualService", "ratings")
    ours = _specs(OURS / "virtual-service-ratings-delay-2s.yaml")[key]
    theirs = _specs(TASK / "02-virtualservice-ratings-delay-2s.yaml")[key]
    ours_delay, their_delay = ours.http[0].fault.delay, theirs.http[0].fault.delay
    assert (ours_delay.fixed_delay, ours_delay.share) == (2.0, 100.0)
    assert (their_delay.fixed_delay, their_delay.share) == (2.0, 100.0)
    assert ours.http[0].route == theirs.http[0].route


def test_every_istio_sample_we_mirror_has_a_file_here() -> None:
    ours = {p.name for p in OURS.glob("*.yaml")}
    assert set(SAME_AS_ISTIO) | {"virtual-service-ratings-delay-2s.yaml"} == ours


def _by_key(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r.kind, r.name): r.raw for r in parse_all(load_documents([path]))}


def test_platform_matches_istios_bookinfo_yaml() -> None:
    ours = _by_key(BOOKINFO / "platform/bookinfo.yaml")
    theirs = _by_key(ISTIO / "platform/kube/bookinfo.yaml")
    assert sorted(ours) == sorted(theirs)
    for key, their in theirs.items():
        our = ours[key]
        assert our["metadata"] == their["metadata"], key
        if key[0] != "Deployment":
            assert our.get("spec") == their.get("spec"), key
            continue
        assert {k: our["spec"][k] for k in ("replicas", "selector")} == \
               {k: their["spec"][k] for k in ("replicas", "selector")}, key
        our_pod, their_pod = our["spec"]["template"], their["spec"]["template"]
        assert our_pod["metadata"] == their_pod["metadata"], key
        assert our_pod["spec"]["serviceAccountName"] == their_pod["spec"]["serviceAccountName"], key
        [our_container], [their_container] = our_pod["spec"]["containers"], their_pod["spec"]["containers"]
        assert our_container["name"] == their_container["name"]
        assert our_container["ports"] == their_container["ports"] == [{"containerPort": 9080}]
        assert our_container["command"][:3] == ["python", "-m", f"app.{our_container['name']}"]
        assert our_container["image"]


def test_reviews_versions_are_chosen_as_istios_images_choose_them() -> None:
    platform = _by_key(BOOKINFO / "platform/bookinfo.yaml")
    deployments = {name: raw for (kind, name), raw in platform.items() if kind == "Deployment"}

    def env(name: str) -> dict[str, str]:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if "value" in e}

    assert "ENABLE_RATINGS" not in env("reviews-v1")
    assert env("reviews-v2")["ENABLE_RATINGS"] == env("reviews-v3")["ENABLE_RATINGS"] == "true"
    assert (env("reviews-v2")["STAR_COLOR"], env("reviews-v3")["STAR_COLOR"]) == ("black", "red")


def test_kizuna_up_examples_bookinfo_reads_the_app_the_gateway_and_the_destination_rules() -> None:
    _, resources = load([str(BOOKINFO)])
    kinds: dict[str, set[str]] = {}
    for r in resources:
        kinds.setdefault(r.kind, set()).add(r.name)
    assert kinds == {
        "Service": {"details", "ratings", "reviews", "productpage"},
        "ServiceAccount": {f"bookinfo-{s}" for s in ("details", "ratings", "reviews", "productpage")},
        "Deployment": {"details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3",
                       "productpage-v1"},
        "Gateway": {"bookinfo-gateway"},
        "VirtualService": {"bookinfo"},
        "DestinationRule": {"details", "ratings", "reviews", "productpage"},
    }


def test_ratings_v2_is_istios_deployment_with_a_local_command() -> None:
    """As Istio's platform/kube/bookinfo-ratings-v2.yaml (not in the sample corpus here): Deployment ratings-v2,
    labels app ratings and version v2, service account bookinfo-ratings-v2, port 9080; ours runs
    ``app.ratings`` as v2, whose database is an in-process stand-in for MongoDB."""
    ours = _by_key(BOOKINFO / "platform/bookinfo-ratings-v2.yaml")
    assert sorted(ours) == [("Deployment", "ratings-v2"), ("ServiceAccount", "bookinfo-ratings-v2")]
    deployment = ours[("Deployment", "ratings-v2")]
    labels = {"app": "ratings", "version": "v2"}
    assert deployment["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"] == labels
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"] == labels and pod["spec"]["serviceAccountName"] == "bookinfo-ratings-v2"
    [container] = pod["spec"]["containers"]
    assert container["ports"] == [{"containerPort": 9080}]
    assert container["command"][:3] == ["python", "-m", "app.ratings"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["SERVICE_VERSION"] == "v2" and env["DB_TYPE"] == "mongodb"
