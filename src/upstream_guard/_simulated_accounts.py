"""The simulator's ``POST /api/token``: Spotify's accounts host, as clients meet it.

Grants: ``client_credentials``, ``authorization_code`` and ``refresh_token`` (with a client
secret, or PKCE's ``client_id`` alone where Spotify allows it). The form body and the client
authentication (HTTP Basic, or ``client_id``/``client_secret`` in the form) are checked, and
mistakes are answered as Spotify answers them: 400 with the OAuth error shape
``{"error": ..., "error_description": ...}`` and no ``status`` field. Any non-empty client id
and secret are accepted; a refresh token is good unless it was revoked with
``SpotifySimulator.revoke``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

SCOPES = "playlist-read-private user-read-email user-read-playback-state user-read-private"
FORM = "application/x-www-form-urlencoded"
Answer = tuple[int, dict[str, Any]]


def _error(error: str, description: str, status: int = 400) -> Answer:
    return status, {"error": error, "error_description": description}


class TokenEndpoint:
    """Issues tokens; remembers revoked refresh tokens. Thread-safe."""

    def __init__(self) -> None:
        """No token issued, none revoked."""
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        self._revoked: set[str] = set()

    def revoke(self, refresh_token: str) -> None:
        """Answer ``invalid_grant`` / ``Refresh token revoked`` to this refresh token."""
        with self._lock:
            self._revoked.add(refresh_token)

    def forget(self) -> None:
        """Un-revoke every refresh token."""
        with self._lock:
            self._revoked.clear()

    def answer(self, method: str, headers: Mapping[bytes, bytes], body: bytes) -> Answer:
        """The status and JSON body for one request to ``/api/token``."""
        form = _form(method, headers, body)
        if isinstance(form, tuple):
            return form
        secret = _client_secret(headers.get(b"authorization", b"").decode("latin-1"), form)
        if secret is None:
            return _error("invalid_client", "Invalid client")
        grant = form["grant_type"]
        if grant == "client_credentials":
            if not secret:
                return _error("invalid_client", "Invalid client secret")
            return 200, self._token(scope=None, refresh=False)
        if grant == "authorization_code":
            return self._code(form, pkce=not secret)
        return self._refresh(form.get("refresh_token", ""), pkce=not secret)

    def _code(self, form: Mapping[str, str], *, pkce: bool) -> Answer:
        if not form.get("code"):
            return _error("invalid_request", "code must be supplied")
        if pkce and not form.get("code_verifier"):
            return _error("invalid_request", "code_verifier required")
        return 200, self._token(scope=SCOPES, refresh=True)

    def _refresh(self, refresh_token: str, *, pkce: bool) -> Answer:
        if not refresh_token:
            return _error("invalid_request", "refresh_token must be supplied")
        with self._lock:
            revoked = refresh_token in self._revoked
        if revoked:
            return _error("invalid_grant", "Refresh token revoked")
        # A PKCE client gets a new refresh token with each refresh; others keep theirs.
        return 200, self._token(scope=SCOPES, refresh=pkce)

    def _token(self, *, scope: str | None, refresh: bool) -> dict[str, Any]:
        with self._lock:
            serial = next(self._serial)
        token: dict[str, Any] = {
            "access_token": f"BQsim-access-{serial:06d}",
            "token_type": "Bearer",
            "expires_in": 3600,
        }
        if scope is not None:
            token["scope"] = scope
        if refresh:
            token["refresh_token"] = f"AQsim-refresh-{serial:06d}"
        return token


def _form(method: str, headers: Mapping[bytes, bytes], body: bytes) -> dict[str, str] | Answer:
    """The form with a known ``grant_type``, or the error answer."""
    if method != "POST":
        return _error("invalid_request", f"{method} is not allowed: POST the form", 405)
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    if content_type.split(";")[0].strip().lower() != FORM:
        # Spotify parses nothing from another body, so the grant type is what it misses.
        return _error("unsupported_grant_type", "grant_type parameter is missing")
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    grant = form.get("grant_type", "")
    if not grant:
        return _error("unsupported_grant_type", "grant_type parameter is missing")
    if grant not in ("client_credentials", "authorization_code", "refresh_token"):
        return _error(
            "unsupported_grant_type",
            "grant_type must be client_credentials, authorization_code or refresh_token",
        )
    return form


def _client_secret(authorization: str, form: Mapping[str, str]) -> str | None:
    """The client's secret ("" for a PKCE client, which names only its id); None: no client."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, _, secret = decoded.partition(":")
        return secret if client_id and secret else None
    return form.get("client_secret", "") if form.get("client_id") else None
