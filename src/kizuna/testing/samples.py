"""Where Istio's sample and task YAML (the compatibility corpus) lives for tests.

``KIZUNA_ISTIO_SAMPLES`` names it; otherwise ``../shared/istio-samples`` beside the checkout, then
``/work/shared/istio-samples``. Tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]


def istio_samples() -> Path:
    """The corpus directory (which may not exist)."""
    candidates = [Path(p) for p in (os.environ.get("KIZUNA_ISTIO_SAMPLES"),) if p]
    candidates += [_REPO.parent / "shared" / "istio-samples", Path("/work/shared/istio-samples")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


ISTIO_SAMPLES = istio_samples()
