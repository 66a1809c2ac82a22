"""Object metadata shared by every kind: name, namespace (``default`` when absent), labels and annotations."""

from __future__ import annotations

from pydantic import Field

from kizuna.api.fields import DnsLabel, DnsSubdomain, KubeModel, Labels

DEFAULT_NAMESPACE = "default"


class ObjectMeta(KubeModel):
    """The part of ``metadata`` kizuna uses; server-set fields (uid, resourceVersion...) are ignored."""

    name: DnsSubdomain
    namespace: DnsLabel = DEFAULT_NAMESPACE
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
