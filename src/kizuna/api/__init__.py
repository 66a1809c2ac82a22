"""Mesh resources as plain data: Kubernetes Deployment/Service/ServiceAccount and Istio VirtualService,
DestinationRule, ServiceEntry, Gateway, PeerAuthentication, AuthorizationPolicy and RequestAuthentication, read
from YAML and validated with errors that name the file, the resource and the field.

The bottom layer of kizuna: imports only pydantic, PyYAML and the standard library.
"""

from kizuna.api.codec import Document, dump_json, dump_yaml, load_documents, parse_text
from kizuna.api.errors import ValidationError
from kizuna.api.meta import DEFAULT_NAMESPACE, ObjectMeta
from kizuna.api.validate import KIZUNA_KINDS, SUPPORTED_KINDS, Resource, Spec, parse, parse_all

__all__ = [
    "DEFAULT_NAMESPACE", "Document", "KIZUNA_KINDS", "ObjectMeta", "Resource", "SUPPORTED_KINDS", "Spec",
    "ValidationError", "dump_json", "dump_yaml", "load_documents", "parse", "parse_all", "parse_text",
]
