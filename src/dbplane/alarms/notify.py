"""Webhook notifications of alarm transitions: an HTTP POST of a JSON body, a short timeout,
a bounded number of attempts with back-off. Deliveries run in the background so that a slow
receiver never holds up the evaluator; the URL is logged only as scheme://host:port/...
(paths and queries often carry a token)."""

from __future__ import annotations

import asyncio
import logging

import httpx

from .model import redact

log = logging.getLogger("dbplane.alarms")

TIMEOUT = 3.0
ATTEMPTS = 3
BACKOFF = (1.0, 3.0)          # seconds before the 2nd and 3rd attempt
MAX_PENDING = 100             # deliveries in flight; more are dropped with a log line


async def post(url: str, body: dict, *, timeout: float = TIMEOUT, attempts: int = ATTEMPTS,
               backoff: tuple[float, ...] = BACKOFF) -> bool:
    """POST body to url until a 2xx answer; True when delivered. A 4xx other than 408 and 429
    is not retried (the receiver refuses it)."""
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http:
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff[min(attempt - 1, len(backoff) - 1)])
            try:
                r = await http.post(url, json=body, headers={"User-Agent": "dbplane-alarms"})
            except httpx.HTTPError as e:
                log.warning("webhook %s for alarm %s: attempt %d failed: %s", redact(url), body.get("alarm"),
                            attempt + 1, type(e).__name__)
                continue
            if r.is_success:
                return True
            log.warning("webhook %s for alarm %s: attempt %d answered HTTP %d", redact(url),
                        body.get("alarm"), attempt + 1, r.status_code)
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                return False
    return False


class Notifier:
    """Fire-and-forget deliveries, each a task kept until it finishes."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def send(self, urls: list[str], body: dict) -> None:
        for url in urls:
            if len(self._tasks) >= MAX_PENDING:
                log.warning("webhook %s for alarm %s dropped: %d deliveries pending", redact(url),
                            body.get("alarm"), len(self._tasks))
                continue
            task = asyncio.create_task(post(url, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
