"""RequestAuthentication: end-user JWTs verified on inbound requests (Envoy's jwt_authn filter, as Istio sets it).

A request without a token passes with no end-user identity (an AuthorizationPolicy may then require one); a
request with a token that does not verify is refused with 401. Tokens are read from ``Authorization: Bearer``
and the ``access_token`` query parameter unless a rule names its own headers / parameters / cookies. The
token's ``iss`` picks the rule; its keys come from inline ``jwks`` or from ``jwksUri``, fetched in the
background, cached and refreshed (:class:`JwksCache`; failures show in ``/stats``). Signatures are checked
with PyJWT (RS*, PS*, ES*, EdDSA, HS* with ``oct`` keys); ``alg: none`` and tokens over ``MAX_TOKEN_BYTES``
are refused; ``exp`` / ``nbf`` allow Istio's 60 s of clock skew.

After a token verifies: ``outputPayloadToHeader`` gets the base64url payload, ``outputClaimToHeaders`` the
claims, and unless ``forwardOriginalToken`` the header that carried the token is removed before the app.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

from kizuna.proxy.authz import JwtIdentity
from kizuna.proxy.http_client import request
from kizuna.proxyconfig.security import JwtRule

if TYPE_CHECKING:
    import jwt as pyjwt

log = logging.getLogger("kizuna.proxy.jwt")

Headers = tuple[tuple[bytes, bytes], ...]

MAX_TOKEN_BYTES: Final = 8192
"""Longer tokens are refused before any parsing (Envoy's header limits make bigger ones unusable anyway)."""
CLOCK_SKEW: Final = 60.0
"""Seconds of leeway on ``exp`` and ``nbf`` (Istio's default, ``clock_skew_seconds``)."""
REFRESH_SECONDS: Final = 20 * 60.0
"""How often a fetched JWKS is fetched again (Istio's ``PILOT_JWT_PUB_KEY_REFRESH_INTERVAL``)."""
RETRY_SECONDS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between failed fetches (the last repeats)."""
MAX_JWKS_BYTES: Final = 1 << 20
"""A larger key set is refused (its fetch fails, the old keys stay)."""
ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                               "ES512", "EdDSA", "HS256", "HS384", "HS512"})

# Envoy's jwt_authn status messages (what a client reads in the 401 body).
MALFORMED: Final = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
BAD_HEADER: Final = "Jwt header is an invalid JSON"
UNSUPPORTED_ALG: Final = "Jwt header [alg] field is required and must be a supported algorithm"
UNKNOWN_ISSUER: Final = "Jwt issuer is not configured"
EXPIRED: Final = "Jwt is expired"
NOT_YET_VALID: Final = "Jwt not yet valid"
BAD_AUDIENCE: Final = "Audiences in Jwt are not allowed"
VERIFY_FAILED: Final = "Jwt verification fails"
NO_KEY: Final = "Jwks doesn't have key to match kid or alg from Jwt"
FETCH_FAILED: Final = "Jwks remote fetch is failed"
TOO_LARGE: Final = "Jwt is too large"


class JwtFailure(Exception):
    """A token was presented and did not verify; ``str()`` is the message for the 401 body."""


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A request that passed: the end user (None without a token) and the headers to send on."""

    identity: JwtIdentity | None
    headers: Headers
    changed: bool = False
    """True when ``headers`` differ from the request's."""


def _jose() -> ModuleType:
    """PyJWT, imported on first use: it pulls in ``cryptography``, which a sidecar without
    RequestAuthentication should not pay for in memory and start-up time."""
    import jwt

    return jwt


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class JwksEntry:
    """One ``jwksUri``: its keys once fetched, and the fetch history /stats shows."""

    __slots__ = ("uri", "keys", "fetches", "failures", "last_error", "fetched_at", "ready", "task")

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.keys: pyjwt.PyJWKSet | None = None
        self.fetches = 0
        self.failures = 0
        self.last_error = ""
        self.fetched_at = 0.0
        self.ready = asyncio.Event()
        """Set after the first fetch attempt ends, whatever its outcome."""
        self.task: asyncio.Task[None] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"fetches": self.fetches, "failures": self.failures, "last_error": self.last_error,
                "keys": len(self.keys.keys) if self.keys is not None else 0,
                "age_seconds": round(time.monotonic() - self.fetched_at, 1) if self.fetched_at else None}


class JwksCache:
    """Remote key sets by URI, shared by every snapshot of one sidecar: fetched once, then refreshed."""

    def __init__(self, refresh: float = REFRESH_SECONDS) -> None:
        self.entries: dict[str, JwksEntry] = {}
        self.refresh = refresh

    def want(self, uri: str, timeout: float) -> JwksEntry:
        """The entry of ``uri``, its background fetch started on first use (needs a running loop)."""
        entry = self.entries.get(uri)
        if entry is None:
            entry = self.entries[uri] = JwksEntry(uri)
            entry.task = asyncio.get_running_loop().create_task(self._run(entry, timeout))
        return entry

    def retain(self, uris: set[str]) -> None:
        """Stop refreshing key sets no rule uses any more."""
        for uri in list(self.entries):
            if uri not in uris:
                entry = self.entries.pop(uri)
                if entry.task is not None:
                    entry.task.cancel()

    def close(self) -> None:
        self.retain(set())

    def to_json(self) -> dict[str, Any]:
        return {uri: e.to_json() for uri, e in sorted(self.entries.items())}

    async def _run(self, entry: JwksEntry, timeout: float) -> None:
        failures = 0
        while True:
            entry.fetches += 1
            try:
                body = await fetch(entry.uri, timeout)
                entry.keys = _jose().PyJWKSet.from_json(body.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is reported, the old keys stay
                entry.failures += 1
                failures += 1
                entry.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("kizuna jwt: fetching %s failed: %s", entry.uri, entry.last_error)
                wait = RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1]
            else:
                entry.fetched_at = time.monotonic()
                entry.last_error = ""
                failures = 0
                wait = self.refresh
            entry.ready.set()
            await asyncio.sleep(wait)


async def fetch(uri: str, timeout: float = 5.0) -> bytes:
    """GET ``uri`` (http or https, the server's certificate checked against the system's roots) and return
    the body of a 200 answer; raises on anything else (OSError, TimeoutError, ValueError)."""
    url = urlsplit(uri)
    tls = url.scheme == "https"
    response = await request(
        url.hostname or "", url.port or (443 if tls else 80), "GET",
        (url.path or "/") + (f"?{url.query}" if url.query else ""), host_header=url.netloc.rpartition("@")[2],
        headers=((b"Accept", b"application/json"),), timeout=timeout,
        tls=ssl.create_default_context() if tls else None, limit=MAX_JWKS_BYTES)
    if response.status != 200:
        raise ValueError(f"HTTP status {response.status_line}")
    return response.body


class _Rule:
    """A JwtRule with its token locations resolved and inline keys parsed."""

    __slots__ = ("rule", "headers", "params", "cookies", "inline", "inline_error")

    def __init__(self, rule: JwtRule) -> None:
        self.rule = rule
        default = not rule.from_headers and not rule.from_params and not rule.from_cookies
        self.headers: tuple[tuple[bytes, str], ...] = (
            ((b"authorization", "Bearer "),) if default
            else tuple((name.lower().encode(), prefix) for name, prefix in rule.from_headers))
        self.params = ("access_token",) if default else rule.from_params
        self.cookies = rule.from_cookies
        self.inline: pyjwt.PyJWKSet | None = None
        self.inline_error = ""
        if rule.jwks:
            try:
                self.inline = _jose().PyJWKSet.from_json(rule.jwks)
            except Exception as exc:  # noqa: BLE001 - a bad inline JWKS fails its tokens, not the proxy
                self.inline_error = str(exc)


def _token_in(value: str, prefix: str) -> str | None:
    if prefix:
        if value[:len(prefix)].lower() != prefix.lower():
            return None
        value = value[len(prefix):]
    return value.strip() or None


class JwtAuthenticator:
    """The RequestAuthentication rules of one snapshot, ready to check requests."""

    def __init__(self, rules: Sequence[JwtRule], cache: JwksCache) -> None:
        self.rules = [_Rule(r) for r in rules]
        self.cache = cache
        self.entries: dict[str, JwksEntry] = {}

    def start(self) -> None:
        """Begin fetching the remote key sets (call with the loop running)."""
        for r in self.rules:
            if r.rule.jwks_uri and not r.rule.jwks and r.rule.jwks_uri not in self.entries:
                self.entries[r.rule.jwks_uri] = self.cache.want(r.rule.jwks_uri, r.rule.timeout)

    def pending(self) -> list[asyncio.Event]:
        """Key sets whose first fetch has not finished yet."""
        return [e.ready for e in self.entries.values() if not e.ready.is_set()]

    def authenticate(self, headers: Headers, target: bytes) -> Authenticated:
        """Check the request's token(s); raises JwtFailure when one is presented and does not verify."""
        found: list[tuple[_Rule, str, bytes | None]] = []  # (rule, token, header it came in)
        query: list[tuple[str, str]] | None = None
        cookies: dict[str, str] | None = None
        for r in self.rules:
            for name, prefix in r.headers:
                for key, value in headers:
                    if key.lower() == name:
                        token = _token_in(value.decode("latin-1"), prefix)
                        if token is not None:
                            found.append((r, token, name))
            if r.params and b"?" in target:
                if query is None:
                    query = parse_qsl(target.split(b"?", 1)[1].decode("latin-1"))
                found.extend((r, v, None) for k, v in query if k in r.params and v)
            if r.cookies:
                if cookies is None:
                    cookies = _cookies(headers)
                found.extend((r, cookies[c], None) for c in r.cookies if cookies.get(c))
        if not found:
            return Authenticated(None, headers)
        identity: JwtIdentity | None = None
        verified: list[tuple[_Rule, str, bytes | None, dict[str, Any]]] = []
        for token in dict.fromkeys(t for _, t, _ in found):
            candidates = [(r, h) for r, t, h in found if t == token]
            issuer, header = _peek(token)
            match = next(((r, h) for r, h in candidates if r.rule.issuer == issuer), None)
            if match is None:
                raise JwtFailure(UNKNOWN_ISSUER)
            rule, carrier = match
            claims = self._verify(rule, token, header)
            verified.append((rule, token, carrier, claims))
            if identity is None:
                identity = _identity(claims)
        return self._rewrite(headers, verified, identity)

    def _verify(self, r: _Rule, token: str, header: dict[str, Any]) -> dict[str, Any]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise JwtFailure(UNSUPPORTED_ALG)
        keyset = r.inline
        if keyset is None:
            if r.rule.jwks:
                raise JwtFailure(f"{VERIFY_FAILED}: inline jwks unusable ({r.inline_error})")
            entry = self.entries.get(r.rule.jwks_uri)
            keyset = entry.keys if entry is not None else None
            if keyset is None:
                raise JwtFailure(FETCH_FAILED)
        kid = header.get("kid")
        # The key type must suit ``alg`` (PyJWT refuses, e.g., an RSA key for HS256: no key confusion).
        keys = [k for k in keyset.keys if kid is None or k.key_id == kid]
        if not keys:
            raise JwtFailure(NO_KEY)
        last: Exception | None = None
        jose = _jose()
        for key in keys:
            try:
                claims: dict[str, Any] = jose.decode(
                    token, key=key.key, algorithms=[alg], leeway=CLOCK_SKEW,
                    options={"verify_aud": False, "verify_iss": False, "require": []})
            except jose.ExpiredSignatureError:
                raise JwtFailure(EXPIRED) from None
            except jose.ImmatureSignatureError:
                raise JwtFailure(NOT_YET_VALID) from None
            except (jose.PyJWTError, ValueError, TypeError) as exc:
                last = exc
                continue
            break
        else:
            raise JwtFailure(VERIFY_FAILED) from last
        if r.rule.audiences:
            aud = claims.get("aud")
            have = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not set(map(str, have)) & set(r.rule.audiences):
                raise JwtFailure(BAD_AUDIENCE)
        return claims

    def _rewrite(self, headers: Headers, verified: list[tuple[_Rule, str, bytes | None, dict[str, Any]]],
                 identity: JwtIdentity | None) -> Authenticated:
        drop: set[bytes] = set()
        add: list[tuple[bytes, bytes]] = []
        for r, token, carrier, claims in verified:
            rule = r.rule
            if carrier is not None and not rule.forward_original_token:
                drop.add(carrier)
            if rule.output_payload_to_header:
                name = rule.output_payload_to_header.lower().encode()
                drop.add(name)
                add.append((name, token.split(".")[1].encode()))
            for header, claim in rule.output_claim_to_headers:
                name = header.lower().encode()
                drop.add(name)
                value = claims.get(claim)
                if isinstance(value, bool):
                    text = "true" if value else "false"
                elif isinstance(value, (str, int, float)):
                    text = str(value)
                elif isinstance(value, list):
                    text = ",".join(str(v) for v in value)
                else:
                    continue
                add.append((name, text.encode("utf-8")))
        if not drop and not add:
            return Authenticated(identity, headers)
        kept = tuple((k, v) for k, v in headers if k.lower() not in drop)
        return Authenticated(identity, kept + tuple(add), True)


def _peek(token: str) -> tuple[str, dict[str, Any]]:
    """The unverified issuer and header of ``token`` (to pick its rule); JwtFailure if it is not a JWT."""
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtFailure(TOO_LARGE)
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtFailure(MALFORMED)
    try:
        header = json.loads(_b64decode(parts[0]))
        payload = json.loads(_b64decode(parts[1]))
    except (ValueError, binascii.Error):
        raise JwtFailure(BAD_HEADER) from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JwtFailure(BAD_HEADER)
    issuer = payload.get("iss")
    return (issuer if isinstance(issuer, str) else ""), header


def _identity(claims: dict[str, Any]) -> JwtIdentity:
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else tuple(str(a) for a in aud) if isinstance(aud, list) else ()
    azp = claims.get("azp")
    return JwtIdentity(f"{claims.get('iss', '')}/{claims.get('sub', '')}", audiences,
                       azp if isinstance(azp, str) else "", claims)


def _cookies(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers:
        if key.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, eq, val = part.strip().partition("=")
                if eq:
                    out.setdefault(name, val)
    return out
