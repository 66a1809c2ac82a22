"""``kizuna validate``: offline checks, every problem on its own line; Istio's own samples accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kizuna.cli.main import main
from kizuna.testing.samples import ISTIO_SAMPLES

SAMPLES = ISTIO_SAMPLES
REPO = Path(__file__).resolve().parents[2]

TOGETHER = [
    "samples/bookinfo/platform/kube/bookinfo.yaml",
    "samples/bookinfo/networking/destination-rule-all.yaml",
    "samples/bookinfo/networking/virtual-service-all-v1.yaml",
    "samples/httpbin/httpbin.yaml",
    "samples/sleep/sleep.yaml",
    "samples/helloworld/helloworld.yaml",
]
"""Samples that can be applied together (no two define the same resource)."""
ALTERNATIVES = [
    "samples/bookinfo/platform/kube/bookinfo-versions.yaml",
    "samples/bookinfo/networking/destination-rule-all-mtls.yaml",
    "samples/bookinfo/networking/virtual-service-reviews-50-v3.yaml",
    "samples/bookinfo/networking/virtual-service-reviews-jason-v2-v3.yaml",
    "samples/bookinfo/networking/virtual-service-ratings-test-delay.yaml",
    "samples/bookinfo/networking/fault-injection-details-v1.yaml",
    "samples/curl/curl.yaml",
    "samples/tcp-echo/tcp-echo-services.yaml",
    "tasks/circuit-breaking/01-destinationrule-httpbin.yaml",
    "tasks/mirroring/05-virtualservice-destinationrule-httpbin-all-v1.yaml",
    "tasks/mirroring/07-virtualservice-httpbin-mirror-v2.yaml",
    "tasks/request-timeouts/03-virtualservice-reviews-v2-timeout.yaml",
]
"""Samples that are alternatives to the ones above, checked one at a time."""

BAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - timeout: 5 seconds
    route:
    - destination: {host: reviews, subset: v1}
      weight: 150
"""


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio samples not available")
def test_istio_samples_validate_together(kit: Any) -> None:
    result = kit.run_kizuna("validate", *(arg for path in TOGETHER for arg in ("-f", SAMPLES / path)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.endswith(f" resources in {len(TOGETHER)} files: valid\n")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio samples not available")
@pytest.mark.parametrize("sample", ALTERNATIVES)
def test_istio_sample_validates(sample: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(SAMPLES / sample)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.endswith(" in 1 file: valid\n")


def test_bad_file_prints_one_line_per_problem_with_file_resource_and_field(kit: Any, tmp_path: Path) -> None:
    bad = tmp_path / "reviews.yaml"
    bad.write_text(BAD)
    result = kit.run_kizuna("validate", "-f", bad)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert sorted(lines) == [
        f"kizuna: {bad}: VirtualService default/reviews: spec.http[0].route[0].weight: must be between 0 "
        "and 100",
        f"kizuna: {bad}: VirtualService default/reviews: spec.http[0].timeout: must be a duration like 1.5s, "
        "500ms or 1m",
    ]


def test_directories_are_read_like_kubectl_apply_f(kit: Any) -> None:
    example = REPO / "examples" / "httpbin"
    # not recursive: the workloads only
    result = kit.run_kizuna("validate", "-f", example)
    assert (result.returncode, result.stdout) == (0, "7 resources in 2 files: valid\n"), result.stderr
    # -R also reads networking/, whose virtual services are alternatives of one another: each is valid
    result = kit.run_kizuna("validate", "-R", "-f", example)
    assert (result.returncode, result.stdout) == (0, "11 resources in 6 files: valid\n"), result.stderr


def test_missing_file_and_empty_directory(kit: Any, tmp_path: Path) -> None:
    result = kit.run_kizuna("validate", "-f", tmp_path / "absent.yaml")
    assert (result.returncode, result.stderr) == (1, f"kizuna: {tmp_path / 'absent.yaml'}: no such file or "
                                                     "directory\n")
    result = kit.run_kizuna("validate", "-f", tmp_path)
    assert result.returncode == 1 and "no manifests" in result.stderr


def test_yaml_syntax_error_names_file_and_line(kit: Any, tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n   bad: indent\n")
    result = kit.run_kizuna("validate", "-f", bad)
    assert result.returncode == 1
    assert result.stderr.startswith(f"kizuna: {bad}:5: ")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio samples not available")
def test_validating_a_directory_of_alternatives_is_not_a_duplicate_error(kit: Any) -> None:
    # Bookinfo's networking/ holds alternatives (several VirtualServices named reviews): each is valid on its own,
    # so offline validation must not call them duplicates (and every kind there, Gateway included, is taken).
    result = kit.run_kizuna("validate", "-f", SAMPLES / "samples/bookinfo/networking")
    assert result.returncode == 0, result.stderr
    assert "defined more than once" not in result.stderr
    assert result.stdout.rstrip().endswith("valid")
