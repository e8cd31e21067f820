"""Key policies: who may use, manage and delete a KMS key, like AWS KMS key policies.

A key policy is a policy document (security/policy.py, parsed with key_policy=True) kept in
the key's record (`KmsKey.policy`, the JSON as written). Each statement names its
`Principal`: "user/NAME", "role/NAME", "*" (every principal), or "account": every
principal as far as its IAM policies allow (the statement delegates the key to IAM, like
AWS's account principal). `Resource` is "*", the key itself. A key without a policy (every
key created before key policies) has DEFAULT, whose one statement delegates every kms:
action to IAM: IAM policies alone decide, as they always did.

Decision for a principal's action on one key (decide()):

1. an explicit Deny, in an IAM policy or in the key policy, refuses;
2. else a key policy Allow naming the principal (or "*") allows;
3. else a key policy Allow naming "account" allows if an IAM policy allows too;
4. else the action is refused.

IAM policies are evaluated on every name of the key (key/<id> and key/<alias>), so a Deny
written on the alias cannot be side-stepped by calling the key by its id.

Governed are API calls, by principals: the calls on one key (kms:DescribeKey, RotateKey,
..., through iam.Authority.authorize) and the calls that make a resource use a key
(kms:GenerateDataKey: a repository or a database's backups will encrypt with it;
kms:Decrypt: a snapshot copy or a restore reads what it encrypted). The platform's own
services (backup workers, proxies, controller) are no principals: they use the keys on
behalf of the resources they serve, as AWS services do under a grant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..errors import DbplaneError, InvalidInput
from ..models import KmsKey
from . import kms
from . import policy as policies

ACCOUNT = policies.ACCOUNT
ENCRYPT = "kms:GenerateDataKey"        # a resource will encrypt with the key
DECRYPT = "kms:Decrypt"                # a copy or a restore reads what the key encrypted
PUT_POLICY = "kms:PutKeyPolicy"
GET_POLICY = "kms:GetKeyPolicy"

DEFAULT = {"Version": policies.VERSION, "Statement": [
    {"Sid": "EnableIamPolicies", "Effect": "Allow", "Principal": ACCOUNT, "Action": "kms:*",
     "Resource": "*"}]}
DEFAULT_DOCUMENT = json.dumps(DEFAULT, indent=2)


class KeyAccessDenied(DbplaneError):
    code = "access_denied"
    status = 403


@dataclass(frozen=True)
class KeyDecision:
    allowed: bool
    reason: str
    fix: str = ""                      # for a refusal: what would let it through


def document_of(key: KmsKey) -> str:
    return key.policy or DEFAULT_DOCUMENT


def parse(key: KmsKey, document: str | None = None) -> policies.Policy:
    """The key's policy (or `document`, a new one for it), or malformed_policy."""
    return policies.parse(kms.label(key), document_of(key) if document is None else document,
                          key_policy=True)


def names(key: KmsKey) -> list[str]:
    return [f"key/{key.id}"] + ([f"key/{key.alias}"] if key.alias else [])


def governs(request: policies.Request) -> bool:
    """A kms: action on one key (not a list or create on key/*)."""
    return request.action.lower().startswith("kms:") and request.resource.startswith("key/") \
        and request.resource != "key/*"


def _explicit(d: policies.Decision) -> bool:
    return not d.allowed and d.reason.startswith("explicitly denied")


def _only(policy: policies.Policy, delegating: bool) -> policies.Policy:
    """Its Allow statements naming principals directly, or those delegating to IAM."""
    kept = []
    for i, st in enumerate(policy.statements):
        if st.effect != "Allow":
            continue
        principals = tuple(p for p in st.principals if (p == ACCOUNT) == delegating)
        if principals:                 # named as in the whole policy: by Sid, else its number
            kept.append(replace(st, principals=principals, sid=st.sid or str(i + 1)))
    return replace(policy, statements=tuple(kept))


def _edit(key: KmsKey) -> str:
    return (f"dbplane kms get-key-policy {key.id} > p.json, edit it, then dbplane kms put-key-policy "
            f"{key.id} --policy file://p.json")


def decide(key: KmsKey, policy: policies.Policy, iam_policies: list[policies.Policy],
           request: policies.Request) -> KeyDecision:
    """Pure: `request.principal` may do `request.action` on `key` under its key policy
    `policy` and its IAM policies?"""
    who, what = request.principal, request.action
    iam = [policies.evaluate(iam_policies, replace(request, resource=n)) for n in names(key)]
    if denied := next((d for d in iam if _explicit(d)), None):
        return KeyDecision(False, denied.reason, "an explicit Deny wins over every Allow: narrow or "
                           "remove that statement")
    full = policies.evaluate([policy], request)
    if _explicit(full):
        return KeyDecision(False, full.reason, "an explicit Deny wins over every Allow: narrow or remove "
                           f"that statement ({_edit(key)})")
    direct = policies.evaluate([_only(policy, delegating=False)], request)
    if direct.allowed:
        return KeyDecision(True, direct.reason)
    iam_allow = next((d for d in iam if d.allowed), None)
    delegated = policies.evaluate([_only(policy, delegating=True)], request)
    if delegated.allowed and iam_allow:
        return KeyDecision(True, f"{iam_allow.reason}; {delegated.reason.removeprefix('allowed by ')} "
                           "lets IAM policies decide")
    if delegated.allowed:
        return KeyDecision(False, "no attached policy allows it",
                           f"attach a policy that allows {what} on key/{key.id}: dbplane iam attach-policy "
                           f"POLICY --{who.replace('/', ' ', 1)}; or name {who} in the key policy")
    add = (f"have someone allowed to {PUT_POLICY} name {who} in the key policy, or let IAM policies "
           f'decide (Principal "{ACCOUNT}"): {_edit(key)}')
    if iam_allow:
        return KeyDecision(False, f"{iam_allow.reason.removeprefix('allowed by ')} allows it, but "
                           f"{policy.title} neither names {who} for it nor lets IAM policies decide", add)
    return KeyDecision(False, f"neither {policy.title} nor an attached policy allows it", add)


def decide_stored(key: KmsKey, iam_policies: list[policies.Policy],
                  request: policies.Request) -> KeyDecision:
    """decide() under the key's stored policy. One that no longer parses refuses every
    action but reading and replacing it, which IAM policies then decide (a way out)."""
    try:
        policy = parse(key)
    except InvalidInput as e:
        if request.action.lower() not in (GET_POLICY.lower(), PUT_POLICY.lower()):
            return KeyDecision(False, f"its key policy does not parse: {e.message}",
                               f"replace it: dbplane kms put-key-policy {key.id} --policy file://p.json")
        policy = parse(key, DEFAULT_DOCUMENT)
    return decide(key, policy, iam_policies, request)


def refusal(key: KmsKey, request: policies.Request, decision: KeyDecision) -> KeyAccessDenied:
    return KeyAccessDenied(f"{request.principal} is not allowed to {request.action} on KMS key "
                           f"{kms.label(key)} ({decision.reason})", decision.fix, code="access_denied")


async def authorize(store, principal: str, iam_policies: list[policies.Policy],
                    request: policies.Request) -> policies.Decision | None:
    """For iam.Authority.authorize: the decision on a governed request, or KeyAccessDenied.
    None when the request is on no existing key: then IAM policies alone decide (and the
    route answers kms_key_not_found)."""
    if not governs(request):
        return None
    request = replace(request, principal=principal)
    try:
        key = await kms.get_key(store, request.resource.removeprefix("key/"))
    except kms.KmsKeyNotFound:
        return None
    decision = decide_stored(key, iam_policies, request)
    if not decision.allowed:
        raise refusal(key, request, decision)
    return policies.Decision(True, decision.reason)


def managers(key: KmsKey, policy: policies.Policy, candidates: dict[str, list[policies.Policy]],
             context: policies.Request) -> list[str]:
    """The lock-out guard: which of `candidates` (principal -> its IAM policies) could still
    kms:PutKeyPolicy on the key under `policy`, asking as `context` does (source address,
    transport, time)."""
    return [who for who, iam_policies in candidates.items()
            if decide(key, policy, iam_policies, replace(context, action=PUT_POLICY, principal=who,
                                                         resource=f"key/{key.id}")).allowed]


def open_statements(key: KmsKey) -> list[policies.Statement]:
    """Allow statements of the key's policy that give every principal ("*") every kms:
    action with no condition (what the security doctor flags)."""
    try:
        policy = parse(key)
    except InvalidInput:
        return []                      # refused on every call but get and put (decide_stored)
    return [st for st in policy.statements
            if st.effect == "Allow" and "*" in st.principals and not st.conditions
            and any(a.lower() in ("*", "kms:*") for a in st.actions)]
