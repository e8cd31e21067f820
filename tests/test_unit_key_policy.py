"""Key policies' pure logic: the grammar (Principal, Resource "*", kms: actions only), the
decision with IAM (explicit deny first, a principal named directly, delegation to IAM), the
lock-out guard's evaluation and what the doctor flags."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbplane.errors import InvalidInput
from dbplane.models import KmsKey
from dbplane.security import key_policy, policy

pytestmark = pytest.mark.unit

KEY = KmsKey(id="key-0123", alias="alias/orders")
ADMIN = policy.parse("AdministratorAccess", policy.BUILTIN["AdministratorAccess"])


def doc(*statements: dict) -> str:
    return json.dumps({"Version": policy.VERSION, "Statement": list(statements)})


def allow(principal, action="kms:*", **extra) -> dict:
    return {"Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*", **extra}


def deny(principal, action, **extra) -> dict:
    return {"Effect": "Deny", "Principal": principal, "Action": action, "Resource": "*", **extra}


def iam(*statements: dict) -> list[policy.Policy]:
    return [policy.parse("p", {"Version": policy.VERSION, "Statement": list(statements)})]


def decide(document: str | None, iam_policies, action="kms:RotateKey", who="user/bob",
           resource="key/key-0123", **context) -> key_policy.KeyDecision:
    p = key_policy.parse(KEY, document)
    return key_policy.decide(KEY, p, iam_policies,
                             policy.Request(action=action, resource=resource, principal=who, **context))


def test_the_default_policy_lets_iam_decide():
    assert json.loads(key_policy.DEFAULT_DOCUMENT) == key_policy.DEFAULT
    d = decide(None, [ADMIN])
    assert d.allowed and "AdministratorAccess" in d.reason and "lets IAM policies decide" in d.reason
    d = decide(None, [])
    assert not d.allowed and d.reason == "no attached policy allows it"
    assert "dbplane iam attach-policy POLICY --user bob" in d.fix
    only_describe = iam({"Effect": "Allow", "Action": "kms:DescribeKey", "Resource": "key/*"})
    assert decide(None, only_describe, action="kms:DescribeKey").allowed
    assert not decide(None, only_describe, action="kms:ScheduleKeyDeletion").allowed


def test_a_principal_named_in_the_key_policy_needs_no_iam_permission():
    document = doc(allow("account"), allow(["user/alice", "role/app"], ["kms:RotateKey", "kms:Decrypt"]))
    d = decide(document, [], who="user/alice")
    assert d.allowed and d.reason == "allowed by the key policy of key-0123 (alias/orders) statement 2"
    assert decide(document, [], who="role/app", action="kms:Decrypt").allowed
    assert not decide(document, [], who="user/alice", action="kms:ScheduleKeyDeletion").allowed
    everyone = doc(allow("*", "kms:Describe*"))
    assert decide(everyone, [], who="role/anyone", action="kms:DescribeKey").allowed


def test_iam_alone_is_not_enough_without_delegation():
    document = doc(allow("user/alice"))
    d = decide(document, [ADMIN], who="user/bob")
    assert not d.allowed
    assert "policy AdministratorAccess statement Everything allows it" in d.reason
    assert "neither names user/bob for it nor lets IAM policies decide" in d.reason
    assert "put-key-policy key-0123 --policy file://p.json" in d.fix
    d = decide(document, [], who="user/bob")
    assert "neither the key policy of key-0123 (alias/orders) nor an attached policy allows it" in d.reason


def test_an_explicit_deny_wins_in_either_policy():
    document = doc(allow("account"), deny("user/bob", ["kms:RotateKey", "kms:ScheduleKeyDeletion"],
                                          Sid="NoRotate"))
    d = decide(document, [ADMIN])
    assert not d.allowed and d.reason == "explicitly denied by the key policy of key-0123 (alias/orders) " \
                                         "statement NoRotate"
    assert "explicit Deny wins" in d.fix
    assert decide(document, [ADMIN], action="kms:DescribeKey").allowed       # others stay allowed
    assert decide(document, [ADMIN], who="user/carol").allowed
    # "account" or "*" in a Deny: everybody
    assert not decide(doc(allow("user/bob"), deny("*", "kms:Decrypt")), [], action="kms:Decrypt").allowed
    assert not decide(doc(allow("user/bob"), deny("account", "kms:Decrypt")), [],
                      action="kms:Decrypt").allowed
    # a Deny in IAM beats a key policy naming the principal
    no_keys = iam({"Sid": "NoKeys", "Effect": "Deny", "Action": "kms:*", "Resource": "*"})
    d = decide(doc(allow("user/bob")), no_keys)
    assert not d.allowed and "explicitly denied by policy p statement NoKeys" in d.reason


def test_iam_is_evaluated_on_the_id_and_the_alias():
    on_alias = iam({"Effect": "Allow", "Action": "kms:*", "Resource": "key/alias/orders"})
    assert decide(None, on_alias, resource="key/key-0123").allowed
    deny_alias = iam({"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
                     {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "key/alias/orders"})
    assert not decide(None, deny_alias, action="kms:Decrypt", resource="key/key-0123").allowed


def test_conditions_apply_in_key_policies():
    document = doc(allow("user/bob", "kms:Decrypt",
                         Condition={"IpAddress": {"dbplane:SourceIp": "10.0.0.0/8"}}))
    assert decide(document, [], action="kms:Decrypt", source_ip="10.1.2.3").allowed
    assert not decide(document, [], action="kms:Decrypt", source_ip="127.0.0.1").allowed


@pytest.mark.parametrize("document, fragment", [
    ("{nope", "the key policy of key-0123 (alias/orders) is not JSON"),
    (doc({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}), "needs a Principal"),
    (doc(allow("alice")), "principal 'alice' is not user/NAME, role/NAME, 'account' or '*'"),
    (doc(allow("user/../x")), "is not user/NAME"),
    (doc(allow("user/bob", Resource="key/key-0123")), 'the Resource of a key policy is "*"'),
    (doc(allow("user/bob", "db:CreateDatabase")), "is no kms: action"),
    (doc(allow("user/bob", "kms:Nope")), "matches no dbplane action"),
    (doc(allow([])), "Principal must be a non-empty string"),
    (doc({**allow("user/bob"), "NotPrincipal": "user/x"}), "unsupported element 'NotPrincipal'"),
    (json.dumps({"Statement": [allow("*")]}), "Version must be"),
])
def test_malformed_key_policies_are_refused(document, fragment):
    with pytest.raises(InvalidInput) as e:
        key_policy.parse(KEY, document)
    assert e.value.code == "malformed_policy" and fragment in e.value.message, e.value.message


def test_iam_policies_still_refuse_principal():
    with pytest.raises(InvalidInput) as e:
        policy.parse("p", doc(allow("user/bob")))
    assert "unsupported element 'Principal'" in e.value.message and "only in key policies" in e.value.hint


def test_governed_requests():
    assert key_policy.governs(policy.Request(action="kms:RotateKey", resource="key/alias/x"))
    assert not key_policy.governs(policy.Request(action="kms:ListKeys", resource="key/*"))
    assert not key_policy.governs(policy.Request(action="db:Connect", resource="dbuser/x/y"))


def test_a_stored_policy_that_no_longer_parses_refuses_all_but_get_and_put():
    broken = KEY.model_copy(update={"policy": "{broken"})
    request = policy.Request(action="kms:Decrypt", resource="key/key-0123", principal="user/admin")
    d = key_policy.decide_stored(broken, [ADMIN], request)
    assert not d.allowed and "does not parse" in d.reason
    request.action = "kms:PutKeyPolicy"
    assert key_policy.decide_stored(broken, [ADMIN], request).allowed


def test_lockout_guard_finds_who_could_still_change_the_policy():
    context = policy.Request(action="", resource="")
    candidates = {"user/admin": [ADMIN], "user/alice": []}
    assert key_policy.managers(KEY, key_policy.parse(KEY), candidates, context) == ["user/admin"]
    assert key_policy.managers(KEY, key_policy.parse(KEY, doc(allow("user/alice"))), candidates,
                               context) == ["user/alice"]
    ghost = key_policy.parse(KEY, doc(allow("user/ghost")))
    assert key_policy.managers(KEY, ghost, candidates, context) == []
    only_use = doc(allow("account", ["kms:Decrypt", "kms:GenerateDataKey"]))
    assert key_policy.managers(KEY, key_policy.parse(KEY, only_use), candidates, context) == []


def test_open_statements_are_what_the_doctor_flags():
    def opened(document: str) -> list[str]:
        return [st.sid for st in key_policy.open_statements(KEY.model_copy(update={"policy": document}))]
    assert opened("") == []                                          # the default: "account", not "*"
    assert opened(doc(allow("*", Sid="Open"))) == ["Open"]
    assert opened(doc(allow("*", "*", Sid="All"))) == ["All"]
    assert opened(doc(allow("*", "kms:Decrypt"))) == []
    assert opened(doc(allow("*", Condition={"IpAddress": {"dbplane:SourceIp": "10.0.0.0/8"}}))) == []
    assert opened(doc(allow(["user/a", "*"], Sid="Mixed"))) == ["Mixed"]


values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                      lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=10), children, max_size=3), max_leaves=8)
statements = st.fixed_dictionaries({}, optional={
    "Effect": st.sampled_from(["Allow", "Deny"]) | values,
    "Principal": st.sampled_from(["*", "account", "user/bob", "role/x", "user/", "bob"]) | values,
    "Action": st.sampled_from(["*", "kms:*", "kms:Decrypt", "db:Connect", "kms:Nope"]) | values,
    "Resource": st.sampled_from(["*", "key/x"]) | values,
    "Sid": values})


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"Version": st.just(policy.VERSION)},
                             optional={"Statement": statements | st.lists(statements, max_size=3)}))
def test_key_policies_parse_or_refuse(document):
    try:
        parsed = key_policy.parse(KEY, json.dumps(document))
    except InvalidInput as e:
        assert e.code == "malformed_policy" and e.message
        return
    assert all(st.principals and st.resources == ("*",) for st in parsed.statements)
    key_policy.decide(KEY, parsed, [ADMIN], policy.Request(action="kms:Decrypt", resource="key/key-0123",
                                                           principal="user/bob"))
