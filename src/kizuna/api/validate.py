"""Documents in, typed resources out: kind dispatch, validation, pydantic errors made one-line messages.

``parse_all`` is atomic: it reports every problem of every document in one ValidationError and returns nothing
partial, so ``kizuna apply`` either applies a whole set of files or changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from kizuna.api.codec import Document
from kizuna.api.destinationrule import DestinationRuleSpec
from kizuna.api.errors import ValidationError
from kizuna.api.fields import FieldErrors, IstioModel, KubeModel
from kizuna.api.gateway import GatewaySpec
from kizuna.api.meshconfig import MESH_CONFIG_API, MeshConfigSpec
from kizuna.api.meta import DEFAULT_NAMESPACE, ObjectMeta
from kizuna.api.security import (
    SECURITY_API,
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    RequestAuthenticationSpec,
)
from kizuna.api.serviceentry import ServiceEntrySpec
from kizuna.api.virtualservice import VirtualServiceSpec
from kizuna.api.workloads import DeploymentSpec, ServiceAccountSpec, ServiceSpec

Spec = (DeploymentSpec | ServiceSpec | ServiceAccountSpec | VirtualServiceSpec | DestinationRuleSpec
        | ServiceEntrySpec | MeshConfigSpec | GatewaySpec | PeerAuthenticationSpec | AuthorizationPolicySpec
        | RequestAuthenticationSpec)

ISTIO_NETWORKING = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")


class _IstioDocument(IstioModel):
    api_version: str
    kind: str
    metadata: ObjectMeta
    status: dict[str, Any] | None = None  # written by Istio, ignored here


class _VirtualServiceDocument(_IstioDocument):
    spec: VirtualServiceSpec


class _DestinationRuleDocument(_IstioDocument):
    spec: DestinationRuleSpec


class _ServiceEntryDocument(_IstioDocument):
    spec: ServiceEntrySpec


class _GatewayDocument(_IstioDocument):
    spec: GatewaySpec


class _PeerAuthenticationDocument(_IstioDocument):
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()


class _AuthorizationPolicyDocument(_IstioDocument):
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()


class _RequestAuthenticationDocument(_IstioDocument):
    spec: RequestAuthenticationSpec = RequestAuthenticationSpec()


class _MeshConfigDocument(_IstioDocument):
    spec: MeshConfigSpec = MeshConfigSpec()


class _KubeDocument(KubeModel):
    api_version: str
    kind: str
    metadata: ObjectMeta


class _DeploymentDocument(_KubeDocument):
    spec: DeploymentSpec


class _ServiceDocument(_KubeDocument):
    spec: ServiceSpec = ServiceSpec()


class _ServiceAccountDocument(_KubeDocument):
    automount_service_account_token: bool | None = None

    @property
    def spec(self) -> ServiceAccountSpec:
        return ServiceAccountSpec(automount_service_account_token=self.automount_service_account_token)


_Document = (_VirtualServiceDocument | _DestinationRuleDocument | _ServiceEntryDocument | _DeploymentDocument
             | _ServiceDocument | _ServiceAccountDocument | _MeshConfigDocument | _GatewayDocument
             | _PeerAuthenticationDocument | _AuthorizationPolicyDocument | _RequestAuthenticationDocument)
_KINDS: dict[str, tuple[tuple[str, ...], type[_Document]]] = {
    "VirtualService": (ISTIO_NETWORKING, _VirtualServiceDocument),
    "DestinationRule": (ISTIO_NETWORKING, _DestinationRuleDocument),
    "ServiceEntry": (ISTIO_NETWORKING, _ServiceEntryDocument),
    "Gateway": (ISTIO_NETWORKING, _GatewayDocument),
    "PeerAuthentication": (SECURITY_API, _PeerAuthenticationDocument),
    "AuthorizationPolicy": (SECURITY_API, _AuthorizationPolicyDocument),
    "RequestAuthentication": (SECURITY_API, _RequestAuthenticationDocument),
    "MeshConfig": ((MESH_CONFIG_API,), _MeshConfigDocument),
    "Deployment": (("apps/v1",), _DeploymentDocument),
    "Service": (("v1",), _ServiceDocument),
    "ServiceAccount": (("v1",), _ServiceAccountDocument),
}
SUPPORTED_KINDS = tuple(_KINDS)
KIZUNA_KINDS = ("MeshConfig",)
"""kizuna's own kinds (not Kubernetes' or Istio's: no Istio sample holds them)."""


@dataclass(frozen=True)
class Resource:
    """A validated resource: identity, typed ``spec``, and the ``raw`` mapping it was read from."""

    api_version: str
    kind: str
    metadata: ObjectMeta = field(hash=False)
    spec: Spec = field(hash=False)
    raw: dict[str, Any] = field(hash=False, repr=False)
    source: str = ""

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    @property
    def namespace(self) -> str:
        """``metadata.namespace`` (``default`` when the document had none)."""
        return self.metadata.namespace

    @property
    def key(self) -> tuple[str, str, str]:
        """``(kind, namespace, name)``: what identifies the resource in the store."""
        return (self.kind, self.metadata.namespace, self.metadata.name)

    def manifest(self) -> dict[str, Any]:
        """``raw`` with ``metadata.namespace`` filled in (for ``kizuna get -o yaml`` and the store)."""
        out = copy.deepcopy(self.raw)
        meta = out.setdefault("metadata", {})
        if isinstance(meta, dict):
            meta["namespace"] = self.metadata.namespace
        return out


def _identity(doc: Document) -> str:
    kind = doc.raw.get("kind")
    meta = doc.raw.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or not kind:
        return f"document {doc.index + 1}"
    if not isinstance(name, str) or not name:
        return f"{kind} (document {doc.index + 1})"
    return f"{kind} {namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE}/{name}"


def _path(loc: Iterable[int | str]) -> tuple[str, bool]:
    out = ""
    is_key = False
    for part in loc:
        if part == "[key]":
            is_key = True
        elif isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out, is_key


def _got(value: Any) -> str:
    text = repr(value)
    return f" (got {text if len(text) <= 40 else text[:37] + '...'})"


_TYPE_MESSAGES = {
    "int_type": "must be an integer", "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "string_type": "must be a string", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "list_type": "must be a list", "dict_type": "must be a mapping",
    "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
}


def _messages(error: Any) -> list[tuple[str, str]]:
    """(path, message) lines for one pydantic error dict."""
    path, is_key = _path(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, FieldErrors):
        return [(f"{path}.{sub}" if path and sub and not sub.startswith("[") else path + sub, msg)
                for sub, msg in cause.items]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required"
    elif kind in ("value_error", "assertion_error") and cause is not None:
        message = str(cause)
    elif kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind] + _got(error.get("input"))
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}" + _got(error.get("input"))
    elif kind == "too_short":
        minimum = ctx.get("min_length", 1)
        message = "must not be empty" if minimum == 1 else f"must have at least {minimum} items"
    elif kind == "greater_than_equal":
        message = f"must be at least {ctx.get('ge')}"
    elif kind == "less_than_equal":
        message = f"must be at most {ctx.get('le')}"
    else:
        text = str(error.get("msg", kind))
        message = text[:1].lower() + text[1:]
    return [(path, f"key {message}" if is_key else message)]


def _format(doc: Document, items: Iterable[tuple[str, str]]) -> list[str]:
    prefix = f"{doc.source}: {_identity(doc)}"
    return [f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}" for path, message in items]


def parse(doc: Document, default_namespace: str = DEFAULT_NAMESPACE) -> Resource:
    """Validate one document into a Resource; raises ValidationError listing all of its problems."""
    raw = doc.raw
    kind, api_version = raw.get("kind"), raw.get("apiVersion")
    problems: list[tuple[str, str]] = []
    if not isinstance(api_version, str) or not api_version:
        problems.append(("apiVersion", "required" if api_version is None else "must be a string"))
    if not isinstance(kind, str) or not kind:
        problems.append(("kind", "required" if kind is None else "must be a string"))
    if problems:
        raise ValidationError(_format(doc, problems))
    assert isinstance(kind, str) and isinstance(api_version, str)
    if kind not in _KINDS:
        raise ValidationError(_format(doc, [("", f"kind {kind} ({api_version}) is not supported yet")]))
    versions, model = _KINDS[kind]
    if api_version not in versions:
        raise ValidationError(_format(doc, [("apiVersion", f"{api_version} is not supported for {kind} "
                                                           f"(use {' or '.join(versions)})")]))
    data = raw
    meta = raw.get("metadata")
    if isinstance(meta, dict) and not meta.get("namespace"):
        data = {**raw, "metadata": {**meta, "namespace": default_namespace}}
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ValidationError(_format(doc, [m for e in exc.errors() for m in _messages(e)])) from None
    return Resource(api_version, kind, parsed.metadata, parsed.spec, copy.deepcopy(raw), doc.source)


def parse_all(docs: Sequence[Document], default_namespace: str = DEFAULT_NAMESPACE,
              unique: bool = True) -> list[Resource]:
    """Validate every document; on any problem raise one ValidationError with all of them (nothing partial).

    With ``unique`` (what apply needs), the same resource defined twice in one set is an error too: which copy
    should win would be a guess. Offline validation of alternatives (Istio's samples) passes ``unique=False``.
    """
    resources: list[Resource] = []
    errors: list[str] = []
    seen: dict[tuple[str, str, str], Document] = {}
    for doc in docs:
        try:
            resource = parse(doc, default_namespace)
        except ValidationError as exc:
            errors.extend(exc.errors)
            continue
        first = seen.get(resource.key)
        if unique and first is not None:
            where = first.source if first.source != doc.source else f"document {first.index + 1}"
            errors.extend(_format(doc, [("", f"defined more than once (also in {where})")]))
            continue
        seen[resource.key] = doc
        resources.append(resource)
    if errors:
        raise ValidationError(errors)
    return resources
