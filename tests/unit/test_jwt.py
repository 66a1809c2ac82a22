"""RequestAuthentication in the proxy: Istio's demo tokens and key, and tokens minted here from its key.pem."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kizuna.proxy import jwt as kjwt
from kizuna.proxy.jwt import JwksCache, JwtAuthenticator, JwtFailure
from kizuna.proxyconfig.security import JwtRule
from kizuna.testing.samples import ISTIO_SAMPLES

SAMPLES = ISTIO_SAMPLES / "security/tools/jwt/samples"
ISSUER = "testing@secure.istio.io"
PRINCIPAL = f"{ISSUER}/{ISSUER}"

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")


def sample(name: str) -> str:
    return (SAMPLES / name).read_text().strip()


def kid() -> str:
    return str(json.loads(sample("jwks.json"))["keys"][0]["kid"])


def mint(claims: dict[str, Any] | None = None, key: Any = None, alg: str = "RS256",
         headers: dict[str, Any] | None = None) -> str:
    """A token signed with Istio's sample key (as its gen-jwt.py does), or with ``key``."""
    body = {"iss": ISSUER, "sub": ISSUER, "exp": int(time.time()) + 3600, **(claims or {})}
    signing = key if key is not None else sample("key.pem")
    return pyjwt.encode(body, signing, algorithm=alg, headers=headers if headers is not None else {"kid": kid()})


def rule(**kw: Any) -> JwtRule:
    return JwtRule(ISSUER, jwks=kw.pop("jwks", sample("jwks.json")), **kw)


def check(token: str | None, *rules: JwtRule, headers: tuple[tuple[bytes, bytes], ...] = (),
          target: bytes = b"/headers") -> kjwt.Authenticated:
    auth = JwtAuthenticator(rules or (rule(),), JwksCache())
    sent = headers + (((b"Authorization", b"Bearer " + token.encode()),) if token is not None else ())
    return auth.authenticate(sent, target)


def failure(token: str, *rules: JwtRule) -> str:
    with pytest.raises(JwtFailure) as info:
        check(token, *rules)
    return str(info.value)


def test_istio_demo_tokens_verify() -> None:
    demo = check(sample("demo.jwt"))
    assert demo.identity is not None and demo.identity.principal == PRINCIPAL
    assert demo.identity.claims["foo"] == "bar"
    groups = check(sample("groups-scope.jwt"))
    assert groups.identity is not None and groups.identity.claims["groups"] == ["group1", "group2"]
    # forwardOriginalToken is false by default: the app does not see the token
    assert all(name.lower() != b"authorization" for name, _ in demo.headers)


def test_no_token_passes_without_identity() -> None:
    passed = check(None, headers=((b"x-other", b"1"),))
    assert passed.identity is None and passed.headers == ((b"x-other", b"1"),) and not passed.changed


def test_expiry_and_not_before_allow_sixty_seconds_of_skew() -> None:
    now = int(time.time())
    assert check(mint({"exp": now - 30})).identity is not None
    assert failure(mint({"exp": now - 120})) == kjwt.EXPIRED
    assert check(mint({"nbf": now + 30})).identity is not None
    assert failure(mint({"nbf": now + 120})) == kjwt.NOT_YET_VALID


def test_issuer_and_audience() -> None:
    assert failure(mint({"iss": "someone-else"})) == kjwt.UNKNOWN_ISSUER
    with_aud = rule(audiences=("bookinfo", "httpbin"))
    assert failure(mint(), with_aud) == kjwt.BAD_AUDIENCE
    assert failure(mint({"aud": "other"}), with_aud) == kjwt.BAD_AUDIENCE
    ok = check(mint({"aud": ["x", "httpbin"], "azp": "cli"}), with_aud).identity
    assert ok is not None and ok.audiences == ("x", "httpbin") and ok.presenter == "cli"


def test_bad_signature_alg_none_confusion_malformed_and_oversized() -> None:
    header, payload, signature = mint().split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = "admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    assert failure(f"{header}.{forged_payload}.{signature}") == kjwt.VERIFY_FAILED
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert failure(mint(key=other_key)) == kjwt.VERIFY_FAILED
    unsigned = pyjwt.encode({"iss": ISSUER, "sub": "admin"}, None, algorithm="none")
    assert failure(unsigned) == kjwt.UNSUPPORTED_ALG
    # HS256 "signed" with the public key's PEM (the classic key-confusion attack) must not verify.
    public = pyjwt.PyJWK(json.loads(sample("jwks.json"))["keys"][0]).key
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    confused_header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": kid()}).encode()).rstrip(b"=")
    signing_input = confused_header.decode() + "." + payload
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert failure(confused) == kjwt.VERIFY_FAILED
    assert failure("deadbeef") == kjwt.MALFORMED
    assert failure("invalidToken") == kjwt.MALFORMED
    assert failure(mint({"pad": "x" * 9000})) == kjwt.TOO_LARGE
    assert failure(mint(headers={"kid": "unknown"})) == kjwt.NO_KEY


@pytest.mark.parametrize("alg", ["ES256", "PS256", "EdDSA", "RS512"])
def test_other_algorithms_with_inline_jwks(alg: str) -> None:
    key: Any
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = dict(pyjwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key(), as_dict=True))
    jwk["kid"] = "k1"
    inline = rule(jwks=json.dumps({"keys": [jwk]}))
    passed = check(mint(key=key, alg=alg, headers={"kid": "k1"}), inline)
    assert passed.identity is not None and passed.identity.principal == PRINCIPAL


def test_token_locations_and_output_headers() -> None:
    custom = rule(from_headers=(("x-jwt-assertion", ""), ("x-auth", "Token ")), from_params=("token",),
                  output_payload_to_header="x-jwt-payload", output_claim_to_headers=(("x-sub", "sub"),
                                                                                       ("x-groups", "groups")))
    token = mint({"groups": ["g1", "g2"]})
    auth = JwtAuthenticator((custom,), JwksCache())
    by_header = auth.authenticate(((b"X-Auth", b"Token " + token.encode()), (b"x-sub", b"spoofed")), b"/")
    names = dict(by_header.headers)
    assert b"X-Auth" not in names and names[b"x-sub"] == ISSUER.encode()  # spoofed value replaced
    assert names[b"x-groups"] == b"g1,g2"
    assert json.loads(base64.urlsafe_b64decode(names[b"x-jwt-payload"] + b"=="))["groups"] == ["g1", "g2"]
    by_param = auth.authenticate((), b"/get?token=" + token.encode())
    assert by_param.identity is not None
    # Authorization: Bearer is not a location of this rule: that token is not looked at.
    assert auth.authenticate(((b"authorization", b"Bearer " + token.encode()),), b"/").identity is None
    default = JwtAuthenticator((rule(forward_original_token=True),), JwksCache())
    kept = default.authenticate(((b"authorization", b"Bearer " + token.encode()),), b"/")
    assert kept.identity is not None and kept.headers[0][0] == b"authorization"
    assert default.authenticate((), b"/?access_token=" + token.encode()).identity is not None
    cookies = JwtAuthenticator((rule(from_cookies=("session",)),), JwksCache())
    assert cookies.authenticate(((b"cookie", b"a=1; session=" + token.encode()),), b"/").identity is not None


class _JwksServer:
    """A local HTTP server for jwks.json (where Istio's task fetches it from GitHub)."""

    def __init__(self, body: bytes, status: bytes = b"200 OK") -> None:
        self.body = body
        self.status = status
        self.hits = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.hits += 1
        writer.write(b"HTTP/1.1 %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                     % (self.status, len(self.body), self.body))
        await writer.drain()
        writer.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_jwks_uri_fetched_cached_and_failure_visible(loop: asyncio.AbstractEventLoop) -> None:
    async def scenario() -> None:
        good = _JwksServer(Path(SAMPLES / "jwks.json").read_bytes())
        bad = _JwksServer(b"not found", b"404 Not Found")
        servers = [await asyncio.start_server(s.handle, "127.84.0.1", 0) for s in (good, bad)]
        try:
            ports = [s.sockets[0].getsockname()[1] for s in servers]
            cache = JwksCache()
            remote = JwtRule(ISSUER, jwks_uri=f"http://127.84.0.1:{ports[0]}/security/tools/jwt/samples/jwks.json")
            auth = JwtAuthenticator((remote,), cache)
            auth.start()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in auth.pending())), 5)
            assert auth.pending() == []
            for _ in range(3):
                assert auth.authenticate(((b"authorization", b"Bearer " + sample("demo.jwt").encode()),),
                                         b"/").identity is not None
            assert good.hits == 1  # cached
            second = JwtAuthenticator((remote,), cache)  # a new snapshot reuses the fetched keys
            second.start()
            assert second.pending() == [] and good.hits == 1
            broken = JwtRule(ISSUER, jwks_uri=f"http://127.84.0.1:{ports[1]}/jwks.json")
            failing = JwtAuthenticator((broken,), cache)
            failing.start()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in failing.pending())), 5)
            stats = cache.to_json()[broken.jwks_uri]
            assert stats["failures"] == 1 and "404" in stats["last_error"] and stats["keys"] == 0
            with pytest.raises(JwtFailure, match=kjwt.FETCH_FAILED):
                failing.authenticate(((b"authorization", b"Bearer " + sample("demo.jwt").encode()),), b"/")
            assert cache.to_json()[remote.jwks_uri]["keys"] == 1
            cache.close()
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    loop.run_until_complete(scenario())


def test_jwks_uri_is_refetched_and_a_new_key_is_accepted_after_the_refresh(
        loop: asyncio.AbstractEventLoop) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(new_key.public_key()))
    rotated = json.dumps({"keys": [{**new_jwk, "kid": "rotated", "use": "sig", "alg": "RS256"}]}).encode()
    token = mint(key=new_key, headers={"kid": "rotated"})
    old_token = sample("demo.jwt")

    async def scenario() -> None:
        issuer = _JwksServer(Path(SAMPLES / "jwks.json").read_bytes())
        server = await asyncio.start_server(issuer.handle, "127.106.0.1", 0)
        cache = JwksCache(refresh=0.3)
        try:
            port = server.sockets[0].getsockname()[1]
            auth = JwtAuthenticator((JwtRule(ISSUER, jwks_uri=f"http://127.106.0.1:{port}/jwks.json"),), cache)
            auth.start()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in auth.pending())), 10)

            def present(t: str) -> kjwt.Authenticated:
                return auth.authenticate(((b"authorization", b"Bearer " + t.encode()),), b"/")

            assert present(old_token).identity is not None
            with pytest.raises(JwtFailure, match="kid"):
                present(token)  # the issuer's new key is not known yet
            issuer.body = rotated  # the issuer rotates its signing key
            hits = issuer.hits
            deadline = time.monotonic() + 20
            while issuer.hits < hits + 1 or cache.to_json()[auth.rules[0].rule.jwks_uri]["keys"] != 1 \
                    or not _accepts(present, token):
                assert time.monotonic() < deadline, "the key set was not fetched again"
                await asyncio.sleep(0.05)
            assert present(token).identity is not None
            with pytest.raises(JwtFailure, match="kid"):
                present(old_token)  # the refreshed set replaces the old one, as Envoy's does
        finally:
            cache.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())


def _accepts(present: Any, token: str) -> bool:
    try:
        present(token)
    except JwtFailure:
        return False
    return True


def test_a_chunked_jwks_is_used_and_an_oversized_one_fails_visibly(loop: asyncio.AbstractEventLoop) -> None:
    keys = Path(SAMPLES / "jwks.json").read_bytes()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(0, len(keys), 100):  # as servers that stream their answers send it
            writer.write(b"%x\r\n%b\r\n" % (len(keys[i:i + 100]), keys[i:i + 100]))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        huge = _JwksServer(b" " * (kjwt.MAX_JWKS_BYTES + 1))
        servers = [await asyncio.start_server(handle, "127.0.0.1", 0) for handle in (chunked, huge.handle)]
        cache = JwksCache()
        try:
            good, big = (f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}/jwks.json" for s in servers)
            auth = JwtAuthenticator((JwtRule(ISSUER, jwks_uri=good), JwtRule("other", jwks_uri=big)), cache)
            auth.start()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in auth.pending())), 10)
            assert auth.authenticate(((b"authorization", b"Bearer " + sample("demo.jwt").encode()),),
                                     b"/").identity is not None
            stats = cache.to_json()
            assert stats[good]["keys"] == 1 and stats[good]["last_error"] == ""
            assert stats[big]["keys"] == 0
            too_large = f"ResponseTooLarge: the answer is larger than {kjwt.MAX_JWKS_BYTES} bytes"
            assert stats[big]["last_error"] == too_large  # as /stats and ``kizuna status`` show it
        finally:
            cache.close()
            for s in servers:
                s.close()
                await s.wait_closed()

    loop.run_until_complete(scenario())
