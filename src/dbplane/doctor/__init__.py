"""The doctor: checks that diagnose a platform and its databases, each finding with the
evidence it rests on and a concrete fix. `security` finds what is still misconfigured
(docs/security.md#doctor); `diagnose` runs the database checks of `database` and
`platform_checks` on a platform database or any PostgreSQL by URL (docs/doctor.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

Severity = Literal["ok", "info", "warning", "critical"]
ORDER = {"critical": 0, "warning": 1, "info": 2, "ok": 3}


class Finding(BaseModel):
    check: str              # stable id, e.g. "plaintext_allowed"
    severity: Severity
    resource: str           # what it is about: "db/orders", "policy/Admin", "platform"
    summary: str            # one line: what is wrong (or that it is fine)
    evidence: str = ""      # what was looked at
    fix: str = ""           # the command or change that fixes it


def ok(check: str, resource: str, summary: str, evidence: str = "") -> Finding:
    return Finding(check=check, severity="ok", resource=resource, summary=summary, evidence=evidence)


def sort(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (ORDER[f.severity], f.check, f.resource))
