"""Just enough Entra ID for azure-identity: OpenID discovery and the client-credentials token.

Tokens are HS256 JWTs signed with a per-emulator secret, so ARM requests can be checked
for a token this emulator issued, for the right tenant, unexpired.

Besides the one app registration with a client secret, apps with federated identity
credentials (workload identity federation) sign in with a client assertion: as Entra
does, the assertion's issuer, subject and audience must match one of the app's federated
credentials, and its RS256 signature is checked against the keys the issuer publishes
(OpenID discovery, then jwks_uri), fetched from the issuer itself. Such an app may be
limited to resource group scopes (its role assignments); ARM refuses it elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web

TOKEN_LIFETIME = 3599
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"
ISSUER_FETCH_TIMEOUT = 10


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenError(Exception):
    """Why a bearer token was refused: (ARM error code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FederatedCredential:
    """An app's trust in tokens of one external subject (AKS: a ServiceAccount)."""

    issuer: str
    subject: str
    audiences: tuple[str, ...] = (EXCHANGE_AUDIENCE,)


@dataclass
class FederatedApp:
    """An app registration that signs in with client assertions only; scopes: the
    resource groups (ARM IDs) it has roles on, None for the whole subscription."""

    client_id: str
    credentials: list[FederatedCredential]
    scopes: list[str] | None = None


@dataclass(frozen=True)
class IssuerEndpoint:
    """Where the emulator reaches an issuer's discovery documents (Entra reaches a public
    issuer on the internet; a test's issuer is its API server), with the CA to trust."""

    base_url: str
    ca_path: Path | None = None


class AssertionRefused(Exception):
    """Why a client assertion was refused: (AADSTS code number, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Identity:
    """The tenant, the one app registration (client id/secret) and the token signer."""

    tenant_id: str
    client_id: str
    client_secret: str
    accept_client_assertions: bool = True
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    issued: int = 0
    issued_tokens: list[str] = field(default_factory=list)  # for tests that hunt for leaks
    federated_apps: dict[str, FederatedApp] = field(default_factory=dict)
    issuers: dict[str, IssuerEndpoint] = field(default_factory=dict)

    def register_federated_app(
        self,
        client_id: str,
        issuer: str,
        subject: str,
        endpoint: IssuerEndpoint,
        scopes: list[str] | None = None,
    ) -> FederatedApp:
        app = self.federated_apps.setdefault(client_id, FederatedApp(client_id, [], scopes))
        app.credentials.append(FederatedCredential(issuer, subject))
        app.scopes = scopes
        self.issuers[issuer] = endpoint
        return app

    async def _issuer_keys(self, issuer: str) -> list[dict[str, Any]]:
        """The issuer's published signing keys: discovery document, then jwks_uri."""
        endpoint = self.issuers.get(issuer)
        if endpoint is None:
            raise AssertionRefused(
                90061,
                f"AADSTS90061: Request to External OIDC endpoint failed: {issuer} unreachable.",
            )
        context = ssl.create_default_context(
            cafile=str(endpoint.ca_path) if endpoint.ca_path else None
        )
        timeout = aiohttp.ClientTimeout(total=ISSUER_FETCH_TIMEOUT)

        def reachable(url: str) -> str:  # the document's path, where the issuer is reached
            return endpoint.base_url.rstrip("/") + urlsplit(url).path

        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                discovery_url = reachable(f"{issuer.rstrip('/')}/.well-known/openid-configuration")
                async with session.get(discovery_url, ssl=context) as response:
                    response.raise_for_status()
                    discovery = await response.json(content_type=None)
                if discovery.get("issuer") != issuer:
                    named = discovery.get("issuer")
                    raise AssertionRefused(
                        90061, f"AADSTS90061: the discovery document of {issuer} names {named!r}."
                    )
                jwks_url = reachable(discovery["jwks_uri"])
                async with session.get(jwks_url, ssl=context) as response:
                    response.raise_for_status()
                    return list((await response.json(content_type=None))["keys"])
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as error:
            raise AssertionRefused(
                90061,
                f"AADSTS90061: Request to External OIDC endpoint failed: {type(error).__name__}.",
            ) from None

    async def check_assertion(self, app: FederatedApp, assertion: str) -> None:
        """Entra's checks of a federated client assertion, in Entra's words."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AssertionRefused(
                50027, "AADSTS50027: JWT token is invalid or malformed."
            ) from None
        issuer, subject = claims.get("iss", ""), claims.get("sub", "")
        audiences = claims.get("aud", [])
        audiences = [audiences] if isinstance(audiences, str) else list(audiences)
        matched = any(
            c.issuer == issuer and c.subject == subject and set(c.audiences) & set(audiences)
            for c in app.credentials
        )
        if not matched:
            raise AssertionRefused(
                70021,
                "AADSTS70021: No matching federated identity record found for presented "
                f"assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. "
                f"Assertion Audience: '{','.join(audiences)}'.",
            )
        keys = [k for k in await self._issuer_keys(issuer) if k.get("kid") == header.get("kid")]
        if not keys:
            raise AssertionRefused(
                700027,
                "AADSTS700027: Client assertion failed signature validation: the issuer "
                "publishes no key with this kid.",
            )
        try:
            jwt.decode(
                assertion,
                jwt.PyJWK(keys[0]).key,
                algorithms=["RS256"],
                audience=audiences,
                issuer=issuer,
            )
        except jwt.ExpiredSignatureError:
            raise AssertionRefused(
                700024, "AADSTS700024: Client assertion is not within its valid time range."
            ) from None
        except jwt.PyJWTError:
            raise AssertionRefused(
                700027, "AADSTS700027: Client assertion failed signature validation."
            ) from None

    def authorize(self, claims: dict[str, Any], path: str) -> None:
        """A federated app acts only inside its resource group scopes (role assignments)."""
        app = self.federated_apps.get(str(claims.get("appid")))
        if app is None or app.scopes is None or "/resourcegroups/" not in path.lower():
            return
        scope = "/".join(path.split("/")[:5])  # /subscriptions/S/resourceGroups/RG
        if not any(scope.lower() == s.lower().rstrip("/") for s in app.scopes):
            raise TokenError(
                "AuthorizationFailed",
                f"The client '{app.client_id}' with object id '{claims.get('oid')}' does not "
                f"have authorization to perform action over scope '{scope}' or the scope is "
                "invalid. If access was recently granted, please refresh your credentials.",
            )

    # tokens -----------------------------------------------------------------------------

    def issue(
        self, audience: str, lifetime: int = TOKEN_LIFETIME, client_id: str | None = None
    ) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "HS256"}
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": client_id or self.client_id,
            "tid": self.tenant_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, client_id or self.client_id)),
            "sub": client_id or self.client_id,
            "jti": uuid.uuid4().hex,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = hmac.new(self.signing_key, signing_input.encode(), hashlib.sha256).digest()
        self.issued += 1
        token = f"{signing_input}.{_b64(sig)}"
        self.issued_tokens.append(token)
        return token

    def verify(self, authorization: str | None, audiences: set[str]) -> dict[str, Any]:
        """Claims of a valid `Bearer` token, else TokenError with ARM's code."""
        if not authorization:
            raise TokenError(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise TokenError(
                "AuthenticationFailedInvalidHeader",
                "Authentication failed. The 'Authorization' header is provided in an invalid "
                "format.",
            )
        try:
            head, body, sig = token.strip().split(".")
            expected = hmac.new(
                self.signing_key, f"{head}.{body}".encode(), hashlib.sha256
            ).digest()
            if not hmac.compare_digest(expected, _unb64(sig)):
                raise ValueError("signature")
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            raise TokenError("InvalidAuthenticationToken", "The access token is invalid.") from None
        if claims.get("exp", 0) < time.time():
            raise TokenError(
                "ExpiredAuthenticationToken",
                "The access token expiry UTC time is earlier than current UTC time.",
            )
        if claims.get("aud", "").rstrip("/") not in {a.rstrip("/") for a in audiences}:
            raise TokenError(
                "InvalidAuthenticationTokenAudience",
                f"The access token has been obtained for wrong audience or resource "
                f"'{claims.get('aud')}'. It should exactly match with one of the allowed "
                f"audiences {sorted(audiences)}.",
            )
        if claims.get("tid") != self.tenant_id:
            raise TokenError(
                "InvalidAuthenticationTokenTenant",
                "The access token is from the wrong issuer. It must match the tenant "
                f"'https://sts.windows.net/{self.tenant_id}/' associated with this subscription.",
            )
        return claims

    # endpoints --------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        """aiohttp routes for the discovery document and the token endpoint."""

        async def openid_configuration(request: web.Request) -> web.Response:
            base_url = f"{request.scheme}://{request.host}"
            tenant = request.match_info["tenant"]
            if tenant not in (self.tenant_id, "organizations", "common"):
                return web.json_response(
                    {
                        "error": "invalid_tenant",
                        "error_description": f"AADSTS90002: Tenant '{tenant}' not found.",
                        "error_codes": [90002],
                    },
                    status=400,
                )
            root = f"{base_url}/{self.tenant_id}"
            return web.json_response(
                {
                    "token_endpoint": f"{root}/oauth2/v2.0/token",
                    "token_endpoint_auth_methods_supported": [
                        "client_secret_post",
                        "private_key_jwt",
                        "client_secret_basic",
                    ],
                    "jwks_uri": f"{base_url}/{self.tenant_id}/discovery/v2.0/keys",
                    "response_modes_supported": ["query", "fragment", "form_post"],
                    "subject_types_supported": ["pairwise"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "response_types_supported": ["code", "id_token", "code id_token"],
                    "scopes_supported": ["openid", "profile", "email", "offline_access"],
                    "issuer": f"{root}/v2.0",
                    "request_uri_parameter_supported": False,
                    "userinfo_endpoint": f"{base_url}/oidc/userinfo",
                    "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                    "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
                    "http_logout_supported": True,
                    "frontchannel_logout_supported": True,
                    "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
                    "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid"],
                    "tenant_region_scope": "NA",
                    "cloud_instance_name": "kiln.emulator",
                    "cloud_graph_host_name": "graph.windows.net",
                    "msgraph_host": "graph.microsoft.com",
                }
            )

        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            tenant = request.match_info["tenant"]

            def fail(status: int, error: str, description: str, code: int) -> web.Response:
                return web.json_response(
                    {
                        "error": error,
                        "error_description": description,
                        "error_codes": [code],
                        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                        "trace_id": str(uuid.uuid4()),
                        "correlation_id": str(uuid.uuid4()),
                    },
                    status=status,
                )

            if tenant != self.tenant_id:
                return fail(
                    400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.", 90002
                )
            if form.get("grant_type") != "client_credentials":
                return fail(
                    400,
                    "unsupported_grant_type",
                    "AADSTS70003: The app requested an unsupported grant type.",
                    70003,
                )
            client_id = str(form.get("client_id", ""))
            federated = self.federated_apps.get(client_id)
            if client_id != self.client_id and federated is None:
                return fail(
                    400,
                    "unauthorized_client",
                    f"AADSTS700016: Application with identifier '{client_id}' was not found in "
                    f"the directory '{self.tenant_id}'.",
                    700016,
                )
            secret = form.get("client_secret")
            assertion = form.get("client_assertion")
            if federated is not None:
                if assertion is None or form.get("client_assertion_type") != JWT_BEARER:
                    return fail(
                        401,
                        "invalid_client",
                        "AADSTS7000218: The request body must contain the following "
                        "parameter: 'client_assertion' or 'client_secret'.",
                        7000218,
                    )
                try:
                    await self.check_assertion(federated, str(assertion))
                except AssertionRefused as refusal:
                    return fail(401, "invalid_client", refusal.message, refusal.code)
            elif secret is not None:
                if not hmac.compare_digest(str(secret), self.client_secret):
                    return fail(
                        401,
                        "invalid_client",
                        "AADSTS7000215: Invalid client secret provided. Ensure the secret being "
                        "sent in the request is the client secret value, not the client secret "
                        "ID.",
                        7000215,
                    )
            elif assertion is None or not self.accept_client_assertions:
                return fail(
                    401,
                    "invalid_client",
                    "AADSTS7000218: The request body must contain the following parameter: "
                    "'client_assertion' or 'client_secret'.",
                    7000218,
                )
            scope = str(form.get("scope", ""))
            scopes = scope.split()
            resource = next((s for s in scopes if s.endswith("/.default")), None)
            if resource is None:
                return fail(
                    400,
                    "invalid_scope",
                    f"AADSTS1002012: The provided value for scope {scope} is not valid. Client "
                    "credential flows must have a scope value with /.default suffixed to the "
                    "resource identifier (application ID URI).",
                    1002012,
                )
            audience = resource.removesuffix("/.default")
            return web.json_response(
                {
                    "token_type": "Bearer",
                    "expires_in": TOKEN_LIFETIME,
                    "ext_expires_in": TOKEN_LIFETIME,
                    "access_token": self.issue(audience, client_id=client_id),
                }
            )

        return [
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration),
            web.post("/{tenant}/oauth2/v2.0/token", token),
        ]
