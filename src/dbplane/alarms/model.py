"""An alarm's definition (written by the API) and its state (written by the controller's
evaluator), and the validation of a definition: every field error reported at once, in one
line, before anything is stored."""

from __future__ import annotations

import math
import re
import time
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError

from ..errors import InvalidInput
from ..metrics import catalog

State = Literal["OK", "ALARM", "INSUFFICIENT_DATA"]
Comparison = Literal[">", ">=", "<", "<="]
Statistic = Literal["avg", "min", "max"]
TreatMissing = Literal["missing", "breaching", "notBreaching", "ignore"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STORAGE_QUOTA = "storage_quota"       # a denominator: the database's storage quota in bytes
MIN_PERIOD, MAX_PERIOD = 10, 86400
MAX_SPAN = 86400                      # period x evaluation periods: the raw history kept
MAX_WEBHOOKS = 5
HISTORY_KEPT = 50                     # state changes kept per alarm


class AlarmSpec(BaseModel):
    """value = statistic over each period of `metric` (a rate per second for a counter),
    summed over the series of one member / host that differ only in `state`, `role` or
    `device`, divided by `denominator` when set; the worst group counts. The alarm fires when
    `datapoints_to_alarm` of the last `evaluation_periods` values compare true."""
    name: str
    database: str | None = None               # None: platform-wide (e.g. host metrics)
    description: str = ""
    metric: str
    labels: dict[str, str] = Field(default_factory=dict)   # exact label matchers
    denominator: str | None = None             # a metric, or "storage_quota"
    statistic: Statistic = "avg"
    comparison: Comparison = ">"
    threshold: float
    period: int = 60
    evaluation_periods: int = 1
    datapoints_to_alarm: int | None = None     # default: evaluation_periods
    treat_missing: TreatMissing = "missing"
    webhooks: list[str] = Field(default_factory=list)
    default: bool = False                      # one of the defaults dbplane made for the database
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    @property
    def needed(self) -> int:
        return self.datapoints_to_alarm or self.evaluation_periods


class StateChange(BaseModel):
    time: float
    old: State
    new: State
    reason: str
    value: float | None = None


class AlarmState(BaseModel):
    name: str
    database: str | None = None
    state: State = "INSUFFICIENT_DATA"
    reason: str = "not evaluated yet"
    since: float = Field(default_factory=time.time)
    evaluated_at: float = 0.0
    value: float | None = None
    history: list[StateChange] = Field(default_factory=list)    # newest last


class DeletedDefault(BaseModel):
    """A default alarm the user deleted: the controller does not make it again."""
    name: str
    database: str
    time: float = Field(default_factory=time.time)


def webhook_problem(url: str) -> str | None:
    """Why a webhook URL is unusable, or None."""
    if not isinstance(url, str) or len(url) > 2048 or any(c.isspace() for c in url):
        return "a webhook must be one http(s) URL without spaces, at most 2048 characters"
    try:
        parts = urlsplit(url)
        parts.port                                        # noqa: B018 - raises on a bad port
    except ValueError:
        return f"webhook {redact(url)} is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"webhook {redact(url)} must be an http:// or https:// URL with a host"
    return None


def redact(url: str) -> str:
    """A URL as logs and answers may show it: scheme, host and port only, since the path,
    query and user info often carry a secret token."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    rest = "/..." if (parts.path not in ("", "/") or parts.query or parts.username) else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def _field_errors(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        out.append(f"{where}: {err['msg'].lower()}")
    return out


def validate(raw: dict, name: str, databases: set[str]) -> AlarmSpec:
    """The definition in `raw` for alarm `name`, or InvalidInput (code invalid_alarm) listing
    every problem. `databases`: the databases that exist (not being deleted)."""
    if not isinstance(raw, dict):
        raise InvalidInput("an alarm definition must be a JSON object", "see docs/observability.md#alarms",
                           code="invalid_alarm")
    errors: list[str] = []
    if not NAME_RE.match(name or ""):
        errors.append(f"name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    if raw.get("name") not in (None, name):
        errors.append(f"the body names alarm {raw['name']!r}, the path {name!r}")
    fields = {k: v for k, v in raw.items() if k not in ("name", "default", "created_at", "updated_at")}
    unknown = set(fields) - set(AlarmSpec.model_fields)
    errors += [f"unknown field {k!r}" for k in sorted(unknown)]
    known = {k: v for k, v in fields.items() if k not in unknown}
    spec = None
    try:
        spec = AlarmSpec.model_validate({**known, "name": name})
        errors += _check(spec, databases, set())
    except ValidationError as e:
        errors += _field_errors(e)
        # check the fields that did parse too, so that every problem is reported at once
        bad = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
        rest = {k: v for k, v in known.items() if k not in bad}
        stand_in = {k: v for k, v in _STAND_INS.items() if k not in rest}
        try:
            errors += _check(AlarmSpec.model_validate({**stand_in, **rest, "name": name}), databases,
                             bad | set(stand_in))
        except ValidationError:
            pass
    if errors:
        raise InvalidInput("invalid alarm: " + "; ".join(errors),
                           "see the fields in docs/observability.md#alarms", code="invalid_alarm")
    assert spec is not None
    return spec


_STAND_INS = {"metric": "dbplane_member_up", "threshold": 0.0}


def _check(spec: AlarmSpec, databases: set[str], skip: set[str]) -> list[str]:
    """Checks across fields; a check involving a field in `skip` (invalid and already
    reported, or missing) is left out."""
    def ok(*names: str) -> bool:
        return not skip & set(names)

    errors = []
    metric = catalog.BY_NAME.get(spec.metric)
    if ok("metric") and metric is None:
        errors.append(f"unknown metric {spec.metric!r} (see the metric names in docs/observability.md)")
    if ok("metric", "labels", "database") and metric is not None:
        extra = set(spec.labels) - set(metric.labels)
        if extra:
            errors.append(f"{spec.metric} has no label {', '.join(sorted(extra))}; "
                          f"its labels are {', '.join(metric.labels)}")
        if "database" in spec.labels:
            errors.append("set the database with the database field, not a label")
        if spec.database is None and "database" in metric.labels:
            errors.append(f"{spec.metric} belongs to a database: give the database")
        if spec.database is not None and "database" not in metric.labels:
            errors.append(f"{spec.metric} is not a database's metric: leave the database out")
    if ok("denominator") and spec.denominator not in (None, STORAGE_QUOTA, *catalog.BY_NAME):
        errors.append(f"unknown denominator {spec.denominator!r}: a metric name or {STORAGE_QUOTA!r}")
    if ok("denominator", "database") and spec.denominator == STORAGE_QUOTA and spec.database is None:
        errors.append(f"{STORAGE_QUOTA} needs a database")
    if ok("database") and spec.database is not None and spec.database not in databases:
        errors.append(f"database {spec.database!r} does not exist")
    if ok("period") and not MIN_PERIOD <= spec.period <= MAX_PERIOD:
        errors.append(f"period {spec.period} is out of range: {MIN_PERIOD} to {MAX_PERIOD} seconds")
    if ok("evaluation_periods") and not 1 <= spec.evaluation_periods <= 100:
        errors.append(f"evaluation_periods {spec.evaluation_periods} is out of range: 1 to 100")
    elif ok("period", "evaluation_periods") and spec.period * spec.evaluation_periods > MAX_SPAN:
        errors.append("period x evaluation_periods must be at most 86400 s (the raw history kept)")
    if (ok("datapoints_to_alarm", "evaluation_periods") and spec.datapoints_to_alarm is not None
            and not 1 <= spec.datapoints_to_alarm <= spec.evaluation_periods):
        errors.append(f"datapoints_to_alarm {spec.datapoints_to_alarm} must be 1 to evaluation_periods "
                      f"({spec.evaluation_periods})")
    if ok("threshold") and not math.isfinite(spec.threshold):
        errors.append("threshold must be a finite number")
    if ok("webhooks"):
        if len(spec.webhooks) > MAX_WEBHOOKS:
            errors.append(f"at most {MAX_WEBHOOKS} webhooks")
        errors += [p for p in map(webhook_problem, spec.webhooks) if p]
    return errors
