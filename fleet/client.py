"""The CLI's side of the controller API (``--controller URL``): urllib, errors as one line each.

A controller that does not answer is a TransportError naming the URL; an error the controller
reports is a ConfigError with its message (bad token, busy group, unknown rollout), or a
TransportError when it is a 503 (its database is away).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

from edgefleet.errors import ConfigError, TransportError

__all__ = ["ControllerClient", "client_from_args"]

TIMEOUT_S = 30.0


class ControllerClient:
    def __init__(self, url: str, token: str, ca_file: str | None = None, timeout: float = TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--controller {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=ca_file) if url.startswith("https://") else None

    def request(self, method: str, path: str, body: Any = None, data: bytes | None = None,
                ok_missing: bool = False) -> Any:
        """One API call; the decoded JSON (None for an empty body, or a 404 with ``ok_missing``).

        Raises:
            TransportError: the controller does not answer; ConfigError: it refused the request.
        """
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if ok_missing and exc.code == 404:
                return None
            # 503: the controller answers but cannot reach what it needs (its database): a server fault
            error = TransportError if exc.code == 503 else ConfigError
            raise error(f"controller {self.url}: {_error_text(exc)}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransportError(f"controller {self.url} does not answer: {reason}") from exc
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body=body)

    def upload_artifact(self, sha256: str, data: bytes) -> bool:
        """Upload a model unless the controller has it; True when it was sent."""
        if self._has(sha256):
            return False
        self.request("PUT", f"/v1/artifacts/{sha256}", data=data)
        return True

    def _has(self, sha256: str) -> bool:
        """HEAD carries no error body: any refusal reads as "not there" and the PUT says why."""
        try:
            self.request("HEAD", f"/v1/artifacts/{sha256}")
        except ConfigError:
            return False
        return True


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
        message = body.get("error") if isinstance(body, dict) else None
    except (ValueError, OSError):
        message = None
    return str(message or f"HTTP {exc.code} {exc.reason}")


def client_from_args(url: str, token_file: str | None, ca_file: str | None = None) -> ControllerClient:
    """A client from ``--controller``, ``--token-file`` / ``$EDGEFLEET_TOKEN_FILE`` / ``$EDGEFLEET_TOKEN``.

    Raises:
        ConfigError: no token, or the token file cannot be read.
    """
    from fleet.api import load_token

    path = token_file or os.environ.get("EDGEFLEET_TOKEN_FILE")
    token = load_token(path) if path else os.environ.get("EDGEFLEET_TOKEN", "")
    if not token:
        raise ConfigError("--controller needs a token: --token-file PATH (or EDGEFLEET_TOKEN_FILE)")
    return ControllerClient(url, token, ca_file or os.environ.get("EDGEFLEET_CA"))
