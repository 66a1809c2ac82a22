"""Istio's own sample and task YAML (the compatibility corpus) parses unchanged.

Every document of a supported kind must validate; every other kind must get the one-line "not supported yet"
error for that document only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kizuna.api import KIZUNA_KINDS, SUPPORTED_KINDS, Document, ValidationError, load_documents, parse, parse_all
from kizuna.api.virtualservice import VirtualServiceSpec
from kizuna.api.workloads import DeploymentSpec
from kizuna.testing.samples import ISTIO_SAMPLES

CORPUS = ISTIO_SAMPLES
FILES = sorted(p for sub in ("samples", "tasks") for p in (CORPUS / sub).rglob("*")
               if p.suffix in (".yaml", ".yml"))

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="Istio sample corpus not present")


def _identity(doc: Document) -> str:
    meta = doc.raw["metadata"]
    return f"{doc.raw['kind']} {meta.get('namespace', 'default')}/{meta['name']}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_sample_file(path: Path) -> None:
    docs = load_documents([path])
    assert docs, "every corpus file holds at least one document"
    for doc in docs:
        kind = doc.raw["kind"]
        if kind in SUPPORTED_KINDS:
            resource = parse(doc)
            assert resource.kind == kind
            assert resource.source == str(path)
        else:
            with pytest.raises(ValidationError) as info:
                parse(doc)
            assert info.value.errors == [
                f"{path}: {_identity(doc)}: kind {kind} ({doc.raw['apiVersion']}) is not supported yet"]


def test_corpus_covers_the_supported_kinds() -> None:
    docs = load_documents([CORPUS / "samples", CORPUS / "tasks"])
    kinds = {d.raw["kind"] for d in docs}
    assert set(SUPPORTED_KINDS) - set(KIZUNA_KINDS) <= kinds
    versions = {d.raw["apiVersion"] for d in docs if d.raw["kind"] == "VirtualService"}
    assert {"networking.istio.io/v1", "networking.istio.io/v1alpha3"} <= versions


def test_bookinfo_set_parses_as_one_batch() -> None:
    base = CORPUS / "samples/bookinfo"
    resources = parse_all(load_documents([base / "platform/kube/bookinfo.yaml",
                                          base / "networking/destination-rule-all.yaml",
                                          base / "networking/virtual-service-all-v1.yaml"]))
    kinds = sorted({r.kind for r in resources})
    assert kinds == ["Deployment", "DestinationRule", "Service", "ServiceAccount", "VirtualService"]
    reviews = next(r for r in resources if r.key == ("Deployment", "default", "reviews-v2")).spec
    assert isinstance(reviews, DeploymentSpec)
    assert reviews.selector.match_labels == {"app": "reviews", "version": "v2"}
    assert reviews.service_account_name == "bookinfo-reviews"


def test_deprecated_fault_percent_reads_as_percentage() -> None:
    (doc,) = load_documents([CORPUS / "tasks/request-timeouts/02-virtualservice-ratings-delay-2s.yaml"])
    spec = parse(doc).spec
    assert isinstance(spec, VirtualServiceSpec)
    fault = spec.http[0].fault
    assert fault is not None and fault.delay is not None
    delay = fault.delay
    assert delay.percent == 100 and delay.share == 100.0
    assert delay.fixed_delay == 2.0
