"""Operation bookkeeping: progress, events and the final state, written by the controller;
and the controller's own changes to a spec."""

from __future__ import annotations

from ..errors import DbplaneError
from ..models import DatabaseSpec, Event, Operation, OperationError, OperationEvent, now
from ..store import Store, keys


async def update(store: Store, op: Operation, *, progress: int | None = None,
                 message: str | None = None, state: str | None = None,
                 error: DbplaneError | None = None) -> None:
    changed = False
    if message is not None and message != op.message:
        op.message = message
        op.events.append(OperationEvent(message=message))
        changed = True
    if progress is not None and progress != op.progress:
        op.progress = progress
        changed = True
    if state is not None and state != op.state:
        op.state = state
        changed = True
    if error is not None:
        op.error = OperationError(**error.to_dict())
        changed = True
    if changed:
        op.updated_at = now()
        await store.put(keys.operation(op.id), op)


async def record_event(store: Store, database: str, kind: str, message: str) -> None:
    event = Event(database=database, kind=kind, message=message)
    await store.put(keys.event(database, event.id), event)


async def update_spec(store: Store, read: bytes | None, spec: DatabaseSpec, **changes) -> bool:
    """Write the spec with `changes` only if it still holds `read` (the pass's snapshot of it):
    a user's modify that landed meanwhile is never overwritten with the older spec. False
    when it changed: the next pass decides again on the new spec."""
    key = keys.database_spec(spec.name)
    return await store.commit_if(key, read, {key: spec.model_copy(update=changes)})
