"""The controller's alarm step (leader only, every 10 s): make the default alarms of new
databases, drop the alarms of deleted ones, evaluate every alarm from the collectors' history
(the same reads as GET /v1/databases/{name}/metrics: metrics/remote.py), and on a state change
record it (alarm-state/<name>, with the reason and values), send an event and the webhooks.

It decides from one snapshot per pass and only writes a state when it changed or once a
minute (the latest value), so a pass after a controller restart converges to the same result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ..errors import StoreUnavailable
from ..metrics import catalog, remote
from ..models import DatabaseSpec, DatabaseStatus, Event
from ..store import Store, keys
from . import rules
from .defaults import defaults_for
from .model import HISTORY_KEPT, STORAGE_QUOTA, AlarmSpec, AlarmState, DeletedDefault, StateChange
from .notify import Notifier

log = logging.getLogger("dbplane.alarms")

INTERVAL = 10.0
EVERY_AT_MOST = 60.0       # an alarm is evaluated every min(period, 60 s), checked every 10 s
REFRESH = 60.0             # an unchanged state is rewritten (latest value) this often
SETTLE = 3.0               # periods end this long before now: a scrape in progress (up to 3 s per
                           # member) has not written its samples yet
CONCURRENCY = 8


class Fetcher:
    """Series read from the collectors' history, once per (metric, label matchers, lookback) a
    pass for all databases together (then split by their `database` label), so that the
    defaults of many databases cost a few requests per collector, not a few per database."""

    def __init__(self, store: Store, data_root: Path | None, now: float):
        self.store, self.data_root, self.now = store, data_root, now
        self._cache: dict[tuple, asyncio.Task] = {}

    async def __call__(self, name: str, match: dict[str, str], lookback: float,
                       database: str | None) -> tuple[list[dict], list[str]]:
        key = (name, tuple(sorted(match.items())), lookback)
        if key not in self._cache:
            self._cache[key] = asyncio.ensure_future(remote.history(
                self.store, self.data_root, name, match, self.now - lookback, self.now, None))
        found, failed = await self._cache[key]
        if database is not None:
            found = [s for s in found if s["labels"].get("database") == database]
        return found, failed


async def series_for(spec: AlarmSpec, fetch: Fetcher, db: DatabaseSpec | None) -> tuple[dict, list[str]]:
    """The alarm's groups of points (rates, sums, ratio), and the hosts that did not answer."""
    lookback = spec.period * (spec.evaluation_periods + 1)
    found, failed = await fetch(spec.metric, spec.labels, lookback, spec.database)
    groups = rules.grouped(found, catalog.BY_NAME[spec.metric].type == "counter")
    if spec.denominator == STORAGE_QUOTA:
        quota = (db.storage_gb if db else 0) * 1024 ** 3
        groups = rules.divided(groups, float(quota)) if quota else {}
    elif spec.denominator:
        den_metric = catalog.BY_NAME[spec.denominator]
        den_labels = {k: v for k, v in spec.labels.items() if k in den_metric.labels}
        den_found, den_failed = await fetch(spec.denominator, den_labels, lookback, spec.database)
        groups = rules.divided(groups, rules.grouped(den_found, den_metric.type == "counter"))
        failed = sorted(set(failed) | set(den_failed))
    return groups, failed


def webhook_body(spec: AlarmSpec, old: str, change: StateChange) -> dict:
    return {"alarm": spec.name, "database": spec.database, "description": spec.description,
            "metric": spec.metric, "labels": spec.labels, "denominator": spec.denominator,
            "statistic": spec.statistic, "comparison": spec.comparison, "threshold": spec.threshold,
            "period": spec.period, "evaluation_periods": spec.evaluation_periods,
            "old_state": old, "new_state": change.new, "reason": change.reason, "value": change.value,
            "time": change.time,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(change.time))}


class AlarmEvaluator:
    def __init__(self, data_root: Path | None):
        self.data_root = data_root
        self.notifier = Notifier()
        self._evaluated: dict[str, tuple[float, float]] = {}    # alarm -> (updated_at, last evaluated)

    async def run(self, store: Store, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                started = time.time()
                try:
                    await self.tick(store, started)
                except StoreUnavailable as e:
                    log.warning("alarms: %s", e)
                except Exception:
                    log.exception("alarm evaluation")
                try:
                    await asyncio.wait_for(stopping.wait(), max(0.5, INTERVAL - (time.time() - started)))
                except TimeoutError:
                    pass
        finally:
            await self.notifier.close()

    async def tick(self, store: Store, now: float) -> None:
        raw = await store.get_prefix(keys.databases())
        specs: dict[str, DatabaseSpec] = {}
        statuses: dict[str, DatabaseStatus] = {}
        for k, v in raw.items():
            if k.endswith("/spec"):
                s = DatabaseSpec.model_validate_json(v)
                specs[s.name] = s
            elif k.endswith("/status"):
                statuses[k.split("/")[-2]] = DatabaseStatus.model_validate_json(v)
        alarms = {a.name: a for a in await store.list(keys.alarms(), AlarmSpec)}
        states = {s.name: s for s in await store.list(keys.alarm_states(), AlarmState)}
        deleted = {d.name: d for d in await store.list(keys.alarm_deleted_defaults(), DeletedDefault)}
        await self.tidy(store, specs, alarms, states, deleted)
        await self.ensure_defaults(store, specs, statuses, alarms, deleted)
        fetch = Fetcher(store, self.data_root, now)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(spec: AlarmSpec) -> None:
            async with limit:
                try:
                    await self.evaluate(store, spec, states.get(spec.name), fetch, specs, now)
                except StoreUnavailable:
                    raise
                except Exception:
                    log.exception("evaluating alarm %s", spec.name)
        due = [a for a in alarms.values() if self._due(a, states.get(a.name), now)]
        await asyncio.gather(*(one(a) for a in due))
        for a in due:
            self._evaluated[a.name] = (a.updated_at, now)
        for name in set(self._evaluated) - set(alarms):
            del self._evaluated[name]

    def _due(self, spec: AlarmSpec, state: AlarmState | None, now: float) -> bool:
        """New, changed, never evaluated, or its period (at most a minute) has passed. An
        alarm younger than two periods is looked at every tick: its first period to decide on
        (rules.datapoints) ends at any moment, not on the evaluation's own beat."""
        updated_at, last = self._evaluated.get(spec.name, (None, 0.0))
        if state is None or updated_at != spec.updated_at or now - spec.created_at < 2 * spec.period:
            return True
        return now - last >= min(float(spec.period), EVERY_AT_MOST) - 1.0

    async def tidy(self, store: Store, specs: dict, alarms: dict, states: dict, deleted: dict) -> None:
        """Alarms of databases that no longer exist go with them; states without an alarm too."""
        for name, a in list(alarms.items()):
            if a.database is not None and a.database not in specs:
                log.info("alarm %s: database %s was deleted, deleting the alarm", name, a.database)
                await store.delete(keys.alarm(name))
                del alarms[name]
        for name in states:
            if name not in alarms:
                await store.delete(keys.alarm_state(name))
        for name, d in deleted.items():
            if d.database not in specs:
                await store.delete(keys.alarm_deleted_default(name))

    async def ensure_defaults(self, store: Store, specs: dict, statuses: dict, alarms: dict,
                              deleted: dict) -> None:
        for db in specs.values():
            status = statuses.get(db.name)
            if db.deleting or status is None or not status.ever_available:
                continue
            for spec in defaults_for(db):
                if spec.name in alarms or spec.name in deleted:
                    continue
                if await store.create(keys.alarm(spec.name), spec):     # never over a user's alarm
                    log.info("alarm %s: created (a default of %s)", spec.name, db.name)
                    alarms[spec.name] = spec

    async def evaluate(self, store: Store, spec: AlarmSpec, state: AlarmState | None, fetch: Fetcher,
                       specs: dict, now: float) -> None:
        groups, failed = await series_for(spec, fetch, specs.get(spec.database or ""))
        values = rules.datapoints(groups, spec, now - SETTLE)
        current = state or AlarmState(name=spec.name, database=spec.database, since=now)
        verdict = rules.decide(values, spec, current.state)
        reason = verdict.reason
        if failed and verdict.state != "ALARM":
            reason += f" (no answer from the collector of {', '.join(failed)})"
        changed = state is None or verdict.state != current.state
        if not changed and now - current.evaluated_at < REFRESH:
            return
        update: dict = {"evaluated_at": now, "value": verdict.value}
        if verdict.state != current.state:
            change = StateChange(time=now, old=current.state, new=verdict.state, reason=reason,
                                 value=verdict.value)
            update.update(state=verdict.state, reason=reason, since=now,
                          history=[*current.history, change][-HISTORY_KEPT:])
            log.info("alarm %s: %s -> %s: %s", spec.name, current.state, verdict.state, reason)
        elif state is None:
            update["reason"] = reason
        new = current.model_copy(update=update)
        await store.put(keys.alarm_state(spec.name), new)
        if verdict.state != current.state and rules.notify_worthy(current.state, verdict.state):
            await self.notify(store, spec, current.state, new.history[-1])

    async def notify(self, store: Store, spec: AlarmSpec, old: str, change: StateChange) -> None:
        if spec.database:
            event = Event(database=spec.database, kind="alarm",
                          message=f"alarm {spec.name}: {old} -> {change.new}: {change.reason}")
            await store.put(keys.event(spec.database, event.id), event)
        if spec.webhooks:
            self.notifier.send(spec.webhooks, webhook_body(spec, old, change))
