"""A small synchronous etcd client over etcd's JSON gateway (/v3/kv/*), for the places
that run outside an event loop: `dbplane up` / `down` and tests. An https URL is reached
with the client certificate in `tls` (store/tls.py), an http URL in plaintext."""

from __future__ import annotations

import base64
import ssl

import httpx

from ..errors import StoreUnavailable
from .tls import EtcdTLS, is_https, unreachable_hint


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Gateway:
    def __init__(self, url: str, timeout: float = 5.0, tls: EtcdTLS | None = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.tls = tls if is_https(url) else None

    def _verify(self) -> ssl.SSLContext | bool:
        if self.tls is None:
            return True                 # http, or https verified against the system's CAs
        try:
            return self.tls.ssl_context()
        except (OSError, ssl.SSLError) as e:
            raise StoreUnavailable(f"cannot load the etcd client certificate {self.tls.cert}: {e}",
                                   "run 'dbplane up' on this data root, or copy the client certificate "
                                   "to this host (docs/security-tls.md, 'etcd')") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = httpx.request(method, f"{self.url}{path}", json=body, timeout=self.timeout,
                              verify=self._verify())
            r.raise_for_status()
            return r.json()
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {e}" if is_https(self.url) else type(e).__name__
            raise StoreUnavailable(f"etcd at {self.url} is unreachable ({why})",
                                   unreachable_hint(self.url, self.tls)) from None

    def _post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def healthy(self) -> bool:
        """etcd's /health says it is up (raises StoreUnavailable when it does not answer)."""
        return self._request("GET", "/health").get("health") == "true"

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        r = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
                for kv in r.get("kvs", [])}

    def get(self, key: str) -> bytes | None:
        r = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs", [])
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def put(self, key: str, value: str) -> None:
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def delete(self, key: str) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})
