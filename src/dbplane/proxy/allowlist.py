"""Network allowlists (like security groups): which client addresses may connect to a
database's proxy endpoints.

The check happens when the kernel hands the proxy a connection, before any byte of it is
read: an allowed connection becomes a ClientConn (startup, TLS, login); a refused one
stays a Gate, which reads the client's first packet (so that closing sends FIN, not a
reset that could swallow the answer), answers it with one FATAL ErrorResponse (SQLSTATE
28000) and closes. A refused connection never negotiates TLS, never reaches the login
code and counts against no connection limit, so a flood from a denied address costs an
accept, a write and a close each. Refusals go to the audit log and the proxy's log at most
once per source and database every AUDIT_WINDOW seconds, with a count.

The rule checks the API uses (parse, normalise, add, revoke) live here too, so that the
proxy and the API agree on what a rule means. See docs/security-allowlists.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import pgwire as wire
from ..errors import Conflict, InvalidInput, NotFound
from ..models import AllowRule, default_allowlist
from .client import CLOSED, ClientConn

try:     # written at the same time by the audit log's author; work without it meanwhile
    from ..security import audit
except ImportError:
    audit = None

if TYPE_CHECKING:
    from ..store import Store
    from .proxy import Listener, Proxy

log = logging.getLogger("dbplane.proxy")

MAX_RULES = 50              # per database, like a security group's inbound rules
MAX_DESCRIPTION = 255
AUDIT_WINDOW = 10.0         # s: at most one audit record per (database, source) in this time
MAX_SOURCES = 4096          # sources tracked for aggregation; beyond, one "*" entry per database
FIRST_PACKET_TIMEOUT = 3.0  # s a refused client has to send its first packet

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- rules: parsing and validation (used by the API) ---------------------------------------

def parse_network(text: str) -> Network:
    """A CIDR as the user wrote it -> the network; a bare address means that one host.
    Refuses host bits set (10.1.2.3/8) naming the network meant, like `ip route` does."""
    t = text.strip()
    if not t or len(t) > 64:
        raise InvalidInput(f"invalid CIDR {text!r}", "write an IPv4 or IPv6 network such as "
                           "10.0.0.0/16 or 2001:db8::/32", code="invalid_cidr")
    kind = ipaddress.IPv6Network if ":" in t else ipaddress.IPv4Network
    try:
        return kind(t, strict=True)
    except ValueError as e:
        try:
            network = kind(t, strict=False)
        except ValueError:
            raise InvalidInput(f"invalid CIDR {text!r}: {e}", "write an IPv4 or IPv6 network such as "
                               "10.0.0.0/16 or 2001:db8::/32", code="invalid_cidr") from None
        host = ipaddress.ip_address(t.split("/")[0])
        raise InvalidInput(f"CIDR {text!r} has host bits set: it means the network {network}",
                           f"write {network}, or {host}/{network.max_prefixlen} for that one host",
                           code="cidr_host_bits_set") from None


def check_description(text: str) -> str:
    if len(text) > MAX_DESCRIPTION or any(not ch.isprintable() for ch in text):
        raise InvalidInput(f"invalid rule description {text[:40]!r}...",
                           f"use at most {MAX_DESCRIPTION} printable characters",
                           code="invalid_description")
    return text


def normalize(rules: Iterable[AllowRule]) -> list[AllowRule]:
    """Validated rules with their CIDRs in canonical form: every CIDR parses, no two
    rules name the same network, at most MAX_RULES."""
    out: dict[str, AllowRule] = {}
    for rule in rules:
        cidr = str(parse_network(rule.cidr))
        if cidr in out:
            raise InvalidInput(f"{rule.cidr} is in the allowlist twice (as {cidr})",
                               "list each network once", code="duplicate_rule")
        out[cidr] = AllowRule(cidr=cidr, description=check_description(rule.description))
    if len(out) > MAX_RULES:
        raise InvalidInput(f"{len(out)} allowlist rules; a database has at most {MAX_RULES}",
                           "combine rules into wider networks", code="too_many_rules")
    return list(out.values())


def rules_for_create(rules: list[AllowRule] | None) -> list[AllowRule]:
    """A new database's rules: as given, or the default (loopback only)."""
    return default_allowlist() if rules is None else normalize(rules)


def add_rule(rules: list[AllowRule], db: str, cidr: str, description: str = "") -> list[AllowRule]:
    network = str(parse_network(cidr))
    if any(r.cidr == network for r in rules):
        raise Conflict(f"database {db} already allows {network}",
                       f"to change its description, revoke it ('dbplane db revoke {db} {network}') "
                       "and allow it again", code="duplicate_rule")
    if len(rules) >= MAX_RULES:
        raise InvalidInput(f"database {db} has {len(rules)} allowlist rules, the most it may have",
                           f"revoke rules you no longer need ('dbplane db allowlist {db}'), or "
                           "combine them into wider networks", code="too_many_rules")
    return [*rules, AllowRule(cidr=network, description=check_description(description))]


def remove_rule(rules: list[AllowRule], db: str, cidr: str) -> list[AllowRule]:
    network = str(parse_network(cidr))
    kept = [r for r in rules if r.cidr != network]
    if len(kept) == len(rules):
        raise NotFound(f"database {db} has no allowlist rule for {network}",
                       f"list its rules with 'dbplane db allowlist {db}'", code="rule_not_found")
    return kept


# -- matching --------------------------------------------------------------------------

def client_address(host: str) -> Address | None:
    """The address of a peer as the socket reports it ('fe80::1%eth0', '::ffff:10.0.0.1'),
    or None if it is not an IP address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped       # an IPv4 client of a dual-stack socket
    return address


class Allowlist:
    """Compiled rules of one database: (network, mask) integers per IP version."""

    def __init__(self, cidrs: Iterable[str]):
        self.cidrs = tuple(cidrs)
        self._nets: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for cidr in self.cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            self._nets[net.version].append((int(net.network_address), int(net.netmask)))

    def allows(self, host: str) -> bool:
        address = client_address(host)
        if address is None:
            return False
        value = int(address)
        return any(value & mask == net for net, mask in self._nets[address.version])


CLOSED_LIST = Allowlist(())


def refusal_message(db: str, host: str) -> str:
    address = client_address(host)
    if address is not None:          # the form a rule must match (IPv4 for a mapped address)
        host = str(address)
    cidr = f"{host}/{address.max_prefixlen if address is not None else 32}"
    return (f'no allowlist rule for host "{host}" on database "{db}": allow it with '
            f"'dbplane db allow {db} {cidr}'")


# -- the proxy's side ------------------------------------------------------------------

class Gatekeeper:
    """The proxy's allowlists, the clients they let in (to close those a rule change no
    longer allows) and the aggregated record of refusals."""

    def __init__(self) -> None:
        self.lists: dict[str, Allowlist] = {}
        self.store: Store | None = None
        # every admitted client -> (database, source address); gone with the client
        self.clients: weakref.WeakKeyDictionary[ClientConn, tuple[str, str]] = \
            weakref.WeakKeyDictionary()
        self.refused_total: dict[str, int] = {}      # database -> refusals since start
        self._pending: dict[tuple[str, str], int] = {}   # (db, source) -> refusals not yet recorded
        self._tasks: set[asyncio.Task] = set()

    def allows(self, db: str, host: str) -> bool:
        return self.lists.get(db, CLOSED_LIST).allows(host)

    def update(self, store: Store, rules: dict[str, list[AllowRule]]) -> None:
        """New rules from etcd (every pass). A changed list applies to new connections at
        once; clients it no longer allows are closed."""
        self.store = store
        changed = set()
        for db, db_rules in rules.items():
            cidrs = tuple(r.cidr for r in db_rules)
            if db not in self.lists or self.lists[db].cidrs != cidrs:
                self.lists[db] = Allowlist(cidrs)
                changed.add(db)
        for db in set(self.lists) - set(rules):
            del self.lists[db]
        if changed:
            self._close_disallowed(changed)

    def _close_disallowed(self, databases: set[str]) -> None:
        closed: dict[tuple[str, str], int] = {}
        for client, (db, host) in list(self.clients.items()):
            if db in databases and client.state != CLOSED and not self.allows(db, host):
                client.fatal("28000", f'the allowlist of database "{db}" no longer allows host '
                             f'"{host}": connection closed')
                closed[db, host] = closed.get((db, host), 0) + 1
        for (db, host), count in closed.items():      # one line and one record per source
            what = f"closed {count} open connection{'s' if count > 1 else ''}"
            log.warning("%s: %s from %s: the allowlist no longer allows it", db, what, host)
            self._audit(db, host, f"{what}: a rule change no longer allows its address")

    def admitted(self, client: ClientConn, db: str, host: str) -> None:
        self.clients[client] = (db, host)

    def refused(self, db: str, host: str, role: str) -> None:
        """Count a refusal; record the first of a window at once, the rest as one count
        at the window's end."""
        self.refused_total[db] = self.refused_total.get(db, 0) + 1
        key = (db, host)
        if key not in self._pending and len(self._pending) >= MAX_SOURCES:
            key = (db, "*")          # a flood from very many sources: one entry for all
        if key in self._pending:
            self._pending[key] += 1
            return
        self._pending[key] = 0
        log.warning("%s: refused a connection from %s to the %s endpoint: no allowlist rule allows it",
                    db, host, role)
        self._audit(db, host, f"connection to the {role} endpoint refused: no allowlist rule "
                    "allows its address")
        asyncio.get_running_loop().call_later(AUDIT_WINDOW, self._flush, key)

    def _flush(self, key: tuple[str, str]) -> None:
        count = self._pending.pop(key, 0)
        if not count:
            return                   # quiet for a whole window: the next refusal is recorded at once
        db, host = key
        what = f"refused {count} more connection{'s' if count > 1 else ''}"
        log.warning("%s: %s from %s in the last %g s", db, what, host, AUDIT_WINDOW)
        self._audit(db, host, f"{what} in the last {AUDIT_WINDOW:g} s")
        self._pending[key] = 0
        asyncio.get_running_loop().call_later(AUDIT_WINDOW, self._flush, key)

    def _audit(self, db: str, host: str, detail: str) -> None:
        if audit is None or self.store is None:
            return
        task = asyncio.ensure_future(self._record(self.store, db, host, detail))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _record(store: Store, db: str, host: str, detail: str) -> None:
        try:
            await audit.record(store, principal=None, action="db:Connect", resource=f"db/{db}",
                               source=host, result="denied", code="not_allowlisted", detail=detail)
        except Exception as e:      # the audit log being down must not break the proxy
            log.warning("%s: could not record the refusal of %s in the audit log: %s", db, host, e)


class Gate(asyncio.Protocol):
    """The first protocol of every accepted client connection (the listener's factory
    makes one): hands an allowed connection to a ClientConn, refuses the others."""

    __slots__ = ("proxy", "listener", "transport", "host", "buf", "timer")

    def __init__(self, proxy: Proxy, listener: Listener):
        self.proxy = proxy
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.host = ""
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        db = self.listener.cluster.name
        keeper = self.proxy.gatekeeper
        if keeper.allows(db, host):
            client = ClientConn(self.proxy, self.listener)
            keeper.admitted(client, db, host)
            transport.set_protocol(client)
            client.connection_made(transport)
            return
        self.transport, self.host = transport, host
        keeper.refused(db, host, self.listener.role)
        self.timer = asyncio.get_running_loop().call_later(FIRST_PACKET_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        """Wait for the whole first packet (SSLRequest, GSSENCRequest, StartupMessage or
        CancelRequest), answer it, close. No TLS: the refusal is sent in the clear."""
        if self.transport.is_closing():
            return
        self.buf += data
        if len(self.buf) < 8:
            return
        length = int.from_bytes(self.buf[:4])
        if 8 <= length <= wire.MAX_STARTUP and len(self.buf) < length:
            return
        if int.from_bytes(self.buf[4:8]) != wire.CANCEL_REQUEST:    # a cancel gets no answer
            self.transport.write(wire.error(
                "28000", refusal_message(self.listener.cluster.name, self.host), "FATAL"))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
