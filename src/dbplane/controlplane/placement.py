"""Where a new member goes. Pure functions over a snapshot of hosts and members."""

from __future__ import annotations

from collections import Counter

from ..errors import CapacityError
from ..models import Host, MemberSpec


def choose_host(hosts: list[Host], all_members: list[MemberSpec], db_members: list[MemberSpec],
                kind: str, zone: str | None = None) -> Host:
    """Pick a host for a new member of a database.

    - a Multi-AZ standby (a second primary candidate) goes to a zone that holds no other
      primary candidate of the database;
    - otherwise prefer zones, then hosts, that hold the fewest members of this database,
      then the fewest members overall.
    """
    if not hosts:
        raise CapacityError("no agent is running", "start the platform with 'dbplane up' or "
                            "start an agent with 'dbplane agent --etcd URL --zone Z'",
                            code="no_hosts")
    candidates = hosts
    if zone is not None:
        candidates = [h for h in hosts if h.zone == zone]
        if not candidates:
            known = ", ".join(sorted({h.zone for h in hosts}))
            raise CapacityError(f"no agent is running in zone {zone!r} (zones with agents: {known})",
                                f"choose one of {known}, or start an agent with --zone {zone}",
                                code="zone_unavailable")
    live = [m for m in db_members if not m.deleting]
    if kind == "primary_candidate" and live:
        taken = {m.zone for m in live if m.kind == "primary_candidate"}
        candidates = [h for h in candidates if h.zone not in taken]
        if not candidates:
            zones = sorted({h.zone for h in hosts})
            raise CapacityError(
                f"Multi-AZ needs agents in two zones; only zone {', '.join(zones)} has one",
                "start an agent in another zone ('dbplane agent --zone b ...') or create "
                "the database with --no-multi-az", code="not_enough_zones")
    per_zone = Counter(m.zone for m in live)
    per_host_db = Counter(m.host for m in live)
    per_host = Counter(m.host for m in all_members if not m.deleting)
    return min(candidates, key=lambda h: (per_zone[h.zone], per_host_db[h.name],
                                          per_host[h.name], h.zone, h.name))


def allocate_ports(taken: set[int], start: int, end: int, count: int,
                   is_free=lambda port: True) -> list[int]:
    """`count` ports in [start, end) not recorded as taken and free on the host."""
    found: list[int] = []
    for port in range(start, end):
        if port not in taken and is_free(port):
            found.append(port)
            if len(found) == count:
                return found
    raise CapacityError(f"no free ports left in {start}-{end - 1}",
                        "delete unused databases, or widen member_port_start/member_port_end "
                        "in the platform config (etcd key /dbplane/v1/config)", code="no_ports")
