"""The emulator's Entra endpoint refuses client assertions as Entra does.

The issuer here is a small OIDC issuer of the test's own (a discovery document and a
JWKS), so each way an assertion can be wrong is tried; the same flow with the real API
server's tokens is in test_namespace_identity.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from fakes.arm import ArmEmulator
from fakes.arm.identity import EXCHANGE_AUDIENCE, JWT_BEARER, IssuerEndpoint

# The issuer fixture serves from the loop the tests run in.
pytestmark = [pytest.mark.integration, pytest.mark.azure, pytest.mark.asyncio(loop_scope="session")]

ISSUER = "https://oidc.cluster.test"
SUBJECT = "system:serviceaccount:team-a:builder"
APP = "11111111-2222-3333-4444-555555555555"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


@pytest.fixture(scope="module")
def arm() -> Iterator[ArmEmulator]:
    with ArmEmulator() as emulator:
        yield emulator


@pytest.fixture
async def issuer(arm: ArmEmulator) -> AsyncIterator[None]:
    """Serves discovery (with a jwks_uri on the issuer's public name) and the keys."""

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": ISSUER, "jwks_uri": f"{ISSUER}/openid/v1/jwks"})

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [public_jwk(KEY, "k1")]})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/openid/v1/jwks", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    endpoint = IssuerEndpoint(f"http://127.0.0.1:{runner.addresses[0][1]}")
    arm.identity.register_federated_app(APP, ISSUER, SUBJECT, endpoint)
    yield
    await runner.cleanup()


def assertion(key: rsa.RSAPrivateKey = KEY, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": SUBJECT, "aud": [EXCHANGE_AUDIENCE], "iat": now}
    body |= {"exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def exchange(arm: ArmEmulator, token: str | None, **form: str) -> tuple[int, dict]:
    data = {"grant_type": "client_credentials", "client_id": APP, "scope": f"{arm.url}/.default"}
    if token is not None:
        data |= {"client_assertion_type": JWT_BEARER, "client_assertion": token}
    async with (
        aiohttp.ClientSession() as session,
        session.post(arm.token_url, data=data | form, ssl=False) as response,
    ):
        return response.status, await response.json()


async def test_a_valid_assertion_gets_a_token_for_the_app(arm: ArmEmulator, issuer: None) -> None:
    status, body = await exchange(arm, assertion())
    assert status == 200, body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["appid"] == APP and claims["tid"] == arm.tenant_id


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"sub": "system:serviceaccount:team-b:builder"}, "AADSTS70021"),
        ({"aud": ["api://other"]}, "AADSTS70021"),
        ({"iss": "https://elsewhere.test"}, "AADSTS70021"),
        ({"exp": int(time.time()) - 60}, "AADSTS700024"),
    ],
)
async def test_a_wrong_assertion_is_refused(
    arm: ArmEmulator, issuer: None, claims: dict, code: str
) -> None:
    status, body = await exchange(arm, assertion(**claims))
    assert status == 401
    assert body["error"] == "invalid_client"
    assert body["error_description"].startswith(code), body


async def test_a_key_the_issuer_never_published_fails_signature_validation(
    arm: ArmEmulator, issuer: None
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for token in (assertion(key=other), assertion(key=other, kid="k2")):
        status, body = await exchange(arm, token)
        assert status == 401 and body["error_description"].startswith("AADSTS700027"), body


async def test_an_app_with_federated_credentials_needs_an_assertion(
    arm: ArmEmulator, issuer: None
) -> None:
    status, body = await exchange(arm, None, client_secret="guess")
    assert status == 401 and body["error_description"].startswith("AADSTS7000218")


async def test_an_unreachable_issuer_is_reported(arm: ArmEmulator, issuer: None) -> None:
    arm.identity.issuers[ISSUER] = IssuerEndpoint("http://127.0.0.1:9")  # nothing listens
    status, body = await exchange(arm, assertion())
    assert status == 401 and body["error_description"].startswith("AADSTS90061"), body
