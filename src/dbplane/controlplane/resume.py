"""Resuming Patroni's automatic failover after `dbplane down` paused it."""

from __future__ import annotations

import json

from ..models import DatabaseSpec, MemberStatus
from ..store import keys
from . import operations


async def ensure_resumed(p, spec: DatabaseSpec) -> None:
    """Resume once the Patroni of every member on a live host runs again, so that the
    member with the most WAL is elected rather than the first one to start."""
    marker = p.snap.raw.get(keys.paused_by_down(spec.name))
    if marker is None or float(marker) >= p.started_at:
        return       # paused while this controller ran: the platform is going down
    statuses = p.snap.member_statuses(spec.name)
    live_hosts = {h.name for h in p.snap.hosts()}
    members = [m for m in p.snap.members(spec.name) if not m.deleting and m.host in live_hosts]
    # statuses written before the stop are stale: "running" from then says nothing of now
    if not members or not all(running_since(statuses.get(m.name), float(marker)) for m in members):
        return
    status = p.snap.status(spec.name)
    if status and status.primary in {m.name for m in members}:
        # the primary before the stop takes the lead again instead of whichever member starts
        # first (Patroni's cold start without a leader key still begins a new timeline)
        await p.store.put(keys.patroni_scope(spec.name) + "failover",
                          {"member": status.primary})   # Patroni: member = candidate
    config_key = keys.patroni_scope(spec.name) + "config"
    raw = p.snap.raw.get(config_key)
    if raw:
        config = json.loads(raw)
        config.pop("pause", None)
        await p.store.put(config_key, config)
    await p.store.delete(keys.paused_by_down(spec.name))
    await operations.record_event(p.store, spec.name, "resumed",
                                  "all members are back; automatic failover resumed")


def running_since(status: MemberStatus | None, paused_at: float) -> bool:
    """The agent reported the member's Patroni running after `dbplane down` paused it."""
    return status is not None and status.state == "running" and status.updated_at > paused_at
