"""A small synchronous etcd client over etcd's JSON gateway (/v3/kv/*), for the places
that run outside an event loop: `dbplane up` / `down` and tests."""

from __future__ import annotations

import base64

import httpx

from ..errors import StoreUnavailable


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class Gateway:
    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _post(self, path: str, body: dict) -> dict:
        try:
            r = httpx.post(f"{self.url}{path}", json=body, timeout=self.timeout)
            r.raise_for_status()
            return r.json()
        except httpx.HTTPError as e:
            raise StoreUnavailable(f"etcd at {self.url} is unreachable ({type(e).__name__})",
                                   "start the platform with 'dbplane up'") from None

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
