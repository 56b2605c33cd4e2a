"""Just enough Entra ID for azure-identity: OpenID discovery and the client-credentials token.

Tokens are HS256 JWTs signed with a per-emulator secret, so ARM requests can be checked
for a token this emulator issued, for the right tenant, unexpired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN_LIFETIME = 3599


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


@dataclass
class Identity:
    """The tenant, the one app registration (client id/secret) and the token signer."""

    tenant_id: str
    client_id: str
    client_secret: str
    accept_client_assertions: bool = True
    signing_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    issued: int = 0

    # tokens -----------------------------------------------------------------------------

    def issue(self, audience: str, lifetime: int = TOKEN_LIFETIME) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "HS256"}
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": self.client_id,
            "tid": self.tenant_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id)),
            "sub": self.client_id,
            "jti": uuid.uuid4().hex,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = hmac.new(self.signing_key, signing_input.encode(), hashlib.sha256).digest()
        self.issued += 1
        return f"{signing_input}.{_b64(sig)}"

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
            if client_id != self.client_id:
                return fail(
                    400,
                    "unauthorized_client",
                    f"AADSTS700016: Application with identifier '{client_id}' was not found in "
                    f"the directory '{self.tenant_id}'.",
                    700016,
                )
            secret = form.get("client_secret")
            assertion = form.get("client_assertion")
            if secret is not None:
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
                    "access_token": self.issue(audience),
                }
            )

        return [
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration),
            web.post("/{tenant}/oauth2/v2.0/token", token),
        ]
