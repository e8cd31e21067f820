"""Authentication and authorisation of every API call (an app-wide FastAPI dependency).

1. Authenticate: the request must be signed with an access key (security/signing.py);
   the date must be within 5 minutes and the nonce unseen (no replays). Or it carries a
   session token (security/session_token.py) as `Authorization: Bearer`, over TLS only.
2. Authorise: the route's action and resource (ROUTES below) are evaluated against the
   principal's policies (security/policy.py): explicit deny, then allow, else denied.
3. Tell the audit log who did what: request.state.principal, .action, .resource.

Only PUBLIC routes skip this: the health probe, the OpenAPI schema and the console's files.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request

from ..models import Operation
from ..security import iam, session_token, signing
from ..security.policy import Request as PolicyRequest
from ..security.policy import evaluate as policy_evaluate
from ..store import keys
from . import basic_auth

PUBLIC = {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC |= {"/console", "/console/{path:path}"}   # the console's static files: no data in them
FILTERED_LISTS = {"db/*", "alarm/*"}    # list calls that show each caller the items it may see
WHOAMI = "/v1/whoami"          # any valid signature may ask who it is (like sts get-caller-identity)
SESSION_TOKEN = "/v1/session-token"  # any valid signature may ask for a token (like sts get-session-token)

Resource = str | Callable[[Request], Awaitable[str]]


async def _operation(request: Request) -> str:
    op = await request.app.state.store.get(keys.operation(request.path_params["op_id"]), Operation)
    return f"db/{op.database}" if op else f"operation/{request.path_params['op_id']}"


def _query_db(request: Request) -> str:
    database = request.query_params.get("database")
    return f"db/{database}" if database else "db/*"


async def _events(request: Request) -> str:
    return _query_db(request)


async def _body_name(request: Request) -> str:
    try:
        name = (await request.json()).get("name", "")
    except (ValueError, AttributeError):
        name = ""
    return f"db/{name}" if isinstance(name, str) and name else "db/*"


async def _restore(request: Request) -> str:
    return await _body_name(request)


# (method, route path) -> (action, resource template with the route's path parameters)
ROUTES: dict[tuple[str, str], tuple[str, Resource]] = {
    ("GET", "/v1/classes"): ("platform:DescribeClasses", "*"),
    ("GET", "/v1/hosts"): ("platform:DescribeHosts", "*"),
    ("GET", "/v1/databases"): ("db:DescribeDatabases", "db/*"),
    ("POST", "/v1/databases"): ("db:CreateDatabase", _body_name),
    ("POST", "/v1/databases/restore"): ("db:RestoreDatabase", _restore),
    ("GET", "/v1/databases/{name}"): ("db:DescribeDatabases", "db/{name}"),
    ("DELETE", "/v1/databases/{name}"): ("db:DeleteDatabase", "db/{name}"),
    ("PATCH", "/v1/databases/{name}"): ("db:ModifyDatabase", "db/{name}"),
    ("POST", "/v1/databases/{name}/rotate-credentials"): ("db:RotateCredentials", "db/{name}"),
    ("GET", "/v1/operations"): ("db:DescribeOperations", _events),
    ("GET", "/v1/operations/{op_id}"): ("db:DescribeOperations", _operation),
    ("GET", "/v1/events"): ("db:DescribeEvents", _events),
    ("POST", "/v1/databases/{name}/switchover"): ("db:Switchover", "db/{name}"),
    ("POST", "/v1/databases/{name}/failover"): ("db:Failover", "db/{name}"),
    ("POST", "/v1/databases/{name}/replicas"): ("db:CreateReplica", "db/{name}"),
    ("DELETE", "/v1/databases/{name}/replicas/{member}"): ("db:DeleteReplica", "db/{name}"),
    ("POST", "/v1/databases/{name}/replicas/{member}/promote"): ("db:PromoteReplica", "db/{name}"),
    ("GET", "/v1/databases/{name}/proxy"): ("db:DescribeProxy", "db/{name}"),
    ("PATCH", "/v1/databases/{name}/proxy"): ("db:ModifyProxy", "db/{name}"),
    ("GET", "/v1/databases/{name}/proxy/stats"): ("db:DescribeProxy", "db/{name}"),
    ("GET", "/v1/databases/{name}/allowlist"): ("db:DescribeAllowlist", "db/{name}"),
    ("POST", "/v1/databases/{name}/allowlist"): ("db:AuthorizeIngress", "db/{name}"),
    ("DELETE", "/v1/databases/{name}/allowlist"): ("db:RevokeIngress", "db/{name}"),
    ("PUT", "/v1/databases/{name}/allowlist"): ("db:ModifyAllowlist", "db/{name}"),
    ("POST", "/v1/databases/{name}/snapshots"): ("backup:CreateSnapshot", "db/{name}"),
    ("GET", "/v1/snapshots"): ("backup:DescribeSnapshots", "snapshot/*"),
    ("GET", "/v1/snapshots/{snapshot_id}"): ("backup:DescribeSnapshots", "snapshot/{snapshot_id}"),
    ("DELETE", "/v1/snapshots/{snapshot_id}"): ("backup:DeleteSnapshot", "snapshot/{snapshot_id}"),
    ("POST", "/v1/snapshots/{snapshot_id}/copy"): ("backup:CopySnapshot", "snapshot/{snapshot_id}"),
    ("POST", "/v1/snapshots/{snapshot_id}/verify"): ("backup:VerifySnapshot", "snapshot/{snapshot_id}"),
    ("GET", "/v1/databases/{name}/drills"): ("backup:DescribeDrills", "db/{name}"),
    ("GET", "/v1/databases/{name}/backup"): ("backup:DescribeBackup", "db/{name}"),
    ("PATCH", "/v1/databases/{name}/backup"): ("backup:ModifyBackup", "db/{name}"),
    ("POST", "/v1/repositories"): ("backup:CreateRepository", "repository/*"),
    ("GET", "/v1/repositories"): ("backup:DescribeRepositories", "repository/*"),
    ("GET", "/v1/repositories/{name}"): ("backup:DescribeRepositories", "repository/{name}"),
    ("DELETE", "/v1/repositories/{name}"): ("backup:DeleteRepository", "repository/{name}"),
    ("GET", "/v1/kms/keys"): ("kms:ListKeys", "key/*"),
    ("POST", "/v1/kms/keys"): ("kms:CreateKey", "key/*"),
    ("POST", "/v1/kms/keys/{ref:path}/rotate"): ("kms:RotateKey", "key/{ref}"),
    ("POST", "/v1/kms/keys/{ref:path}/disable"): ("kms:DisableKey", "key/{ref}"),
    ("POST", "/v1/kms/keys/{ref:path}/enable"): ("kms:EnableKey", "key/{ref}"),
    ("POST", "/v1/kms/keys/{ref:path}/schedule-deletion"): ("kms:ScheduleKeyDeletion", "key/{ref}"),
    ("POST", "/v1/kms/keys/{ref:path}/cancel-deletion"): ("kms:CancelKeyDeletion", "key/{ref}"),
    ("GET", "/v1/kms/keys/{ref:path}"): ("kms:DescribeKey", "key/{ref}"),
    ("PATCH", "/v1/kms/keys/{ref:path}"): ("kms:UpdateKey", "key/{ref}"),
    ("GET", "/v1/kms/keys/{ref:path}/policy"): ("kms:GetKeyPolicy", "key/{ref}"),
    ("PUT", "/v1/kms/keys/{ref:path}/policy"): ("kms:PutKeyPolicy", "key/{ref}"),
    ("GET", "/v1/iam/{kind}s"): ("iam:List{Kind}s", "{kind}/*"),
    ("POST", "/v1/iam/{kind}s"): ("iam:Create{Kind}", "{kind}/*"),
    ("GET", "/v1/iam/{kind}s/{name}"): ("iam:Get{Kind}", "{kind}/{name}"),
    ("DELETE", "/v1/iam/{kind}s/{name}"): ("iam:Delete{Kind}", "{kind}/{name}"),
    ("POST", "/v1/iam/{kind}s/{name}/policies"): ("iam:AttachPolicy", "{kind}/{name}"),
    ("DELETE", "/v1/iam/{kind}s/{name}/policies/{policy}"): ("iam:DetachPolicy", "{kind}/{name}"),
    ("GET", "/v1/iam/{kind}s/{name}/access-keys"): ("iam:ListAccessKeys", "{kind}/{name}"),
    ("POST", "/v1/iam/{kind}s/{name}/access-keys"): ("iam:CreateAccessKey", "{kind}/{name}"),
    ("PATCH", "/v1/iam/access-keys/{key_id}"): ("iam:UpdateAccessKey", "access-key/{key_id}"),
    ("DELETE", "/v1/iam/access-keys/{key_id}"): ("iam:DeleteAccessKey", "access-key/{key_id}"),
    ("GET", "/v1/iam/policies"): ("iam:ListPolicies", "policy/*"),
    ("POST", "/v1/iam/policies"): ("iam:CreatePolicy", "policy/*"),
    ("GET", "/v1/iam/policies/{name}"): ("iam:GetPolicy", "policy/{name}"),
    ("DELETE", "/v1/iam/policies/{name}"): ("iam:DeletePolicy", "policy/{name}"),
    ("POST", "/v1/iam/simulate"): ("iam:SimulatePolicy", "*"),
    ("GET", "/v1/audit"): ("audit:LookupEvents", "audit/*"),
    ("GET", "/v1/audit/verify"): ("audit:VerifyLog", "audit/*"),
    ("GET", "/v1/audit/settings"): ("audit:GetSettings", "audit/*"),
    ("PATCH", "/v1/audit/settings"): ("audit:UpdateSettings", "audit/*"),
    ("GET", "/v1/doctor/security"): ("platform:RunDoctor", "*"),
    ("GET", "/v1/doctor/databases/{name}"): ("platform:RunDoctor", "db/{name}"),
    ("GET", "/metrics"): ("metrics:Scrape", "*"),
    ("GET", "/v1/databases/{name}/metrics"): ("db:DescribeMetrics", "db/{name}"),
    ("GET", "/v1/alarms"): ("alarms:DescribeAlarms", "alarm/*"),
    ("GET", "/v1/alarms/{name}"): ("alarms:DescribeAlarms", "alarm/{name}"),
    ("GET", "/v1/alarms/{name}/history"): ("alarms:DescribeAlarms", "alarm/{name}"),
    ("PUT", "/v1/alarms/{name}"): ("alarms:PutAlarm", "alarm/{name}"),
    ("DELETE", "/v1/alarms/{name}"): ("alarms:DeleteAlarm", "alarm/{name}"),
    ("GET", "/v1/databases/{name}/insights"): ("db:DescribeInsights", "db/{name}"),
}


def action_of(request: Request) -> tuple[str, Resource]:
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    found = ROUTES.get((request.method, path))
    if found is None:
        # a route nobody mapped: only a policy allowing every action can call it
        return f"unmapped:{request.method} {path}", "*"
    action, resource = found
    kind = request.path_params.get("kind", "")
    return action.replace("{Kind}", kind.capitalize()), resource


async def resource_of(request: Request, template: Resource) -> str:
    if callable(template):
        return await template(request)
    params = {k: v for k, v in request.path_params.items()}
    return template.format(**params) if "{" in template else template


def _auth_error(message: str, code: str) -> iam.Unauthenticated:
    return iam.Unauthenticated(message, "sign requests with an access key: the CLI uses the "
                               "profile 'dbplane up' wrote to <data root>/credentials, "
                               "DBPLANE_PROFILE or DBPLANE_ACCESS_KEY_ID/DBPLANE_SECRET_ACCESS_KEY",
                               code=code)


def _token_error(message: str, code: str) -> iam.Unauthenticated:
    return iam.Unauthenticated(message, "get a new one with 'dbplane iam get-session-token' over the "
                               "https API, or sign requests with an access key", code=code)


async def _bearer(request: Request, token: str) -> iam.Identity:
    if request.url.scheme != "https":
        raise _token_error("a bearer token is accepted over TLS only (this request came over http)",
                           "insecure_transport")
    try:
        claims = session_token.claims_of(token)
        identity = await request.app.state.authority.identity(claims.key_id)
        request.state.principal = identity.principal
        session_token.verify(token, identity.secret)
    except session_token.TokenError as e:
        raise _token_error(str(e), e.code) from None
    if claims.principal != identity.principal:       # the key moved: never true for a valid MAC
        raise _token_error("the bearer token names another principal than its key", "invalid_token")
    request.state.session_token = True
    return identity


async def authenticate(request: Request) -> iam.Identity:
    header = request.headers.get("authorization")
    if not header:
        raise _auth_error("the request is not signed (no Authorization header)", "unauthenticated")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return await _bearer(request, token.strip())
    if scheme.lower() == "basic" and basic_auth.applies(request):     # Prometheus: GET /metrics only
        return await basic_auth.identity(request, token.strip())
    try:
        key_id, sig = signing.parse_authorization(header)
        signing.check_date(request.headers.get(signing.DATE_HEADER, ""))
        identity = await request.app.state.authority.identity(key_id)
        request.state.principal = identity.principal
        raw = request.scope.get("raw_path", b"").decode("ascii", "replace")
        raw_path = raw.split("?", 1)[0] or request.url.path           # as sent, percent-encoded
        signing.verify(identity.secret, sig, request.method, raw_path, request.url.query,
                       request.headers.get("host", ""), request.headers[signing.DATE_HEADER],
                       request.headers.get(signing.NONCE_HEADER, ""),
                       request.headers.get(signing.BODY_HEADER, ""), await request.body())
    except signing.SignatureError as e:
        raise _auth_error(str(e), e.code) from None
    if not request.app.state.nonces.check_and_add(key_id, request.headers[signing.NONCE_HEADER],
                                                  time.monotonic()):
        raise _auth_error("this request was already received once (a replay)", "replayed_request")
    return identity


async def authorize(request: Request) -> None:
    """The app-wide dependency."""
    route = request.scope.get("route")
    if getattr(route, "path", None) in PUBLIC:
        return
    if getattr(route, "path", None) == WHOAMI:
        request.state.action, request.state.resource = "iam:GetCallerIdentity", "self"
        await authenticate(request)
        return
    if getattr(route, "path", None) == SESSION_TOKEN:
        request.state.action, request.state.resource = "iam:GetSessionToken", "self"
        request.state.identity = await authenticate(request)
        if getattr(request.state, "session_token", False):
            raise iam.AccessDenied("a session token cannot ask for another session token",
                                   "sign the request with an access key", code="access_denied")
        return
    action, template = action_of(request)
    resource = await resource_of(request, template)
    request.state.action, request.state.resource = action, resource
    identity = await authenticate(request)
    authority = request.app.state.authority

    def policy_request(res: str) -> PolicyRequest:
        return PolicyRequest(action=action, resource=res, principal=identity.principal,
                             source_ip=request.client.host if request.client else "",
                             secure_transport=request.url.scheme == "https")

    if request.method == "GET" and resource in FILTERED_LISTS:
        # allowed on everything, or on some items: the handler keeps only those (visible())
        policies = await authority.policies_of(identity.principal)
        if not policy_evaluate(policies, policy_request(resource)).allowed \
                and await authority.may_list(identity.principal, policy_request(resource)):
            request.state.visible = lambda res: policy_evaluate(policies, policy_request(res)).allowed
            return
    await authority.authorize(identity.principal, policy_request(resource))


def visible(request: Request, resource: str) -> bool:
    """Whether a list call's caller may see this item (see authorize)."""
    check = getattr(request.state, "visible", None)
    return check is None or check(resource)
