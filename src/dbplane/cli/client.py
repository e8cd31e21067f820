"""HTTP client of the dbplane API; API errors become DbplaneError with the server's code."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from ..errors import DbplaneError, PlatformNotRunning
from ..paths import Layout, data_root
from ..security import ca, credentials
from ..security.credentials import Credentials
from ..security.signing import SigningAuth
from ..security.tls import verify_for


class BearerAuth(httpx.Auth):
    def __init__(self, token: str):
        self.token = token

    def auth_flow(self, request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class ApiClient:
    """Signs every request with the access key of `credentials` (security/signing.py)."""

    def __init__(self, base_url: str, timeout: float = 30.0, credentials: Credentials | None = None,
                 ca_file: Path | None = None, session_token: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.session_token = session_token
        auth = BearerAuth(session_token) if session_token else \
            SigningAuth(credentials.key_id, credentials.secret) if credentials else None
        # an https API is verified against the platform CA (DBPLANE_CA_FILE, or the data root's)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, auth=auth,
                                  verify=verify_for(self.base_url, ca_file))

    @classmethod
    def from_environment(cls, data_dir: str | None = None, api: str | None = None,
                         profile: str | None = None) -> ApiClient:
        url = api or os.environ.get("DBPLANE_API")
        root = data_root(data_dir)
        if not url:
            url = Layout(root).read_platform().api_url
        # a session token (dbplane iam get-session-token) wins over every access key
        token = os.environ.get("DBPLANE_SESSION_TOKEN") or None
        return cls(url, credentials=None if token else credentials.resolve(root, profile),
                   ca_file=Path(os.environ.get("DBPLANE_CA_FILE") or ca.cert_path(root)),
                   session_token=token)

    def request(self, method: str, path: str, **kwargs):
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate verify failed" in str(e):
                raise DbplaneError(
                    f"the certificate of the dbplane API at {self.base_url} was not verified "
                    f"({str(e).split(']')[-1].strip()[:120]})",
                    "get the platform's CA with 'dbplane ca cert --out ca.pem' on its machine and "
                    "point DBPLANE_CA_FILE at it", code="api_certificate_unverified") from None
            raise PlatformNotRunning(
                f"the dbplane API at {self.base_url} is not answering ({type(e).__name__})",
                "start the platform with 'dbplane up', or check --data-dir / DBPLANE_HOME"
            ) from None
        except httpx.TransportError as e:
            raise PlatformNotRunning(
                f"the dbplane API at {self.base_url} is not answering ({type(e).__name__})",
                "start the platform with 'dbplane up', or check --data-dir / DBPLANE_HOME"
            ) from None
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": f"HTTP {r.status_code}: {r.text[:200]}",
                       "hint": ""}
            raise DbplaneError(err["message"], err.get("hint", ""), code=err["code"],
                               status=r.status_code)
        return r.json()

    def get(self, path: str, **params):
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None):
        return self.request("POST", path, json=body or {})

    def patch(self, path: str, body: dict):
        return self.request("PATCH", path, json=body)

    def delete(self, path: str, **params):
        return self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})


def pgpass_file(data_dir: str | None, db: str) -> Path:
    return Layout(data_root(data_dir)).pgpass(db)
