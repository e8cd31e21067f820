"""dbplane: a self-hosted managed PostgreSQL platform (RDS-like) on Patroni and etcd."""

import os as _os

# gRPC (under aetcd) must not run its fork handlers: a child forked while its threads poll
# (Patroni started by the agent as the service account) otherwise aborts at random in
# gRPC's epoll code ("Check failed: next_worker->state == KICKED") before it can exec.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
