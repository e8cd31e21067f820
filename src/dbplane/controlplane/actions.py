"""Long actions (a Patroni switchover or restart) run in the background, one per key, so a
reconcile pass never blocks on them. A pass starts an action, later passes see it busy,
then take its outcome once. After a controller restart nothing is remembered: callers
judge from the snapshot (who is primary, who still needs a restart) and start again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

log = logging.getLogger("dbplane.controller")


@dataclass
class Outcome:
    what: str
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Actions:
    def __init__(self) -> None:
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}
        self._started: set[str] = set()

    def started_here(self, key: str) -> bool:
        """Whether this controller process ever started an action under key."""
        return key in self._started

    def busy(self, key: str) -> str | None:
        """What is running under key, or None."""
        entry = self._tasks.get(key)
        return entry[0] if entry and not entry[1].done() else None

    def start(self, key: str, what: str, action: Awaitable) -> bool:
        """Run action unless one already runs under key (then report busy: False)."""
        if self.busy(key):
            return False
        log.info("%s: %s", key, what)
        self._started.add(key)
        self._tasks[key] = (what, asyncio.ensure_future(action))
        return True

    def take(self, key: str) -> Outcome | None:
        """The outcome of the finished action under key, once; None if none finished."""
        entry = self._tasks.get(key)
        if entry is None or not entry[1].done():
            return None
        del self._tasks[key]
        what, task = entry
        if task.cancelled():
            return Outcome(what, asyncio.CancelledError())
        error = task.exception()
        if error is not None:
            log.info("%s: %s failed: %s", key, what, error)
        return Outcome(what, error)

    def cancel_all(self) -> None:
        for _, task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
