"""A narrow client of Patroni's REST API (switchover, failover, restart, dynamic config).

Patroni answers /switchover, /failover and /restart only when the action has finished
(up to ~20 s), so the controller runs those through `actions.Actions`, never inline.
httpx errors and Patroni refusals become PatroniError here, with Patroni's own words.
Patroni serves https with a certificate from the platform CA; it is verified against the
CA the controller names with `trust()`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from ..errors import DbplaneError
from ..security.tls import client_context

LONG_TIMEOUT = 90.0     # a restart waits for PostgreSQL to start; a switchover for the promotion
SHORT_TIMEOUT = 5.0


class PatroniError(DbplaneError):
    code = "patroni_refused"
    status = 409


_ca_file: Path | None = None
_context: ssl.SSLContext | None = None


def trust(ca_file: Path) -> None:
    """The platform CA that issued the members' certificates (<data root>/ca/ca.crt); read
    at the first call (on a platform started component by component the first agent
    creates it)."""
    global _ca_file, _context
    _ca_file, _context = ca_file, None


def _verify(url: str, what: str) -> ssl.SSLContext:
    global _context
    if _context is None:
        if _ca_file is None or not _ca_file.exists():
            raise PatroniError(f"{what}: no platform CA to verify Patroni at {url} against",
                               "start the controller with the data root that holds ca/ca.crt",
                               code="patroni_unreachable")
        _context = client_context(_ca_file)
    return _context


def api_url(address: str, api_port: int) -> str:
    return f"https://{address}:{api_port}"


async def _call(url: str, method: str, path: str, body: dict | None, timeout: float,
                what: str) -> str:
    verify = _verify(url, what)
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=verify) as http:
            r = await http.request(method, url + path, json=body)
    except httpx.HTTPError as e:
        cause = "its certificate is not from the platform CA" if "CERTIFICATE_VERIFY_FAILED" in str(e) \
            else type(e).__name__
        raise PatroniError(f"{what}: Patroni at {url} did not answer ({cause})",
                           "check the member's patroni.log under its member directory",
                           code="patroni_unreachable") from None
    if r.status_code >= 400:
        text = r.text.strip().replace("\n", " ")[:200]
        raise PatroniError(f"{what}: Patroni refused (HTTP {r.status_code}: {text})",
                           "see 'dbplane db describe' for the members' state and retry")
    return r.text


async def switchover(url: str, leader: str, candidate: str) -> str:
    """Planned: the leader checkpoints, stops and hands over to the candidate (no data loss)."""
    return await _call(url, "POST", "/switchover", {"leader": leader, "candidate": candidate},
                       LONG_TIMEOUT, f"switchover from {leader} to {candidate}")


async def failover(url: str, candidate: str) -> str:
    """Forced: promote the candidate whatever the leader's state (drills, a sick primary)."""
    return await _call(url, "POST", "/failover", {"candidate": candidate}, LONG_TIMEOUT,
                       f"failover to {candidate}")


async def restart(url: str, member: str) -> str:
    return await _call(url, "POST", "/restart", {}, LONG_TIMEOUT, f"restart of {member}")


async def patch_config(url: str, patch: dict) -> str:
    """Merge `patch` into the cluster's dynamic configuration (None removes a key)."""
    return await _call(url, "PATCH", "/config", patch, SHORT_TIMEOUT, "configuration change")
