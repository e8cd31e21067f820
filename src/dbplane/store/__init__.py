"""etcd: the single source of truth. `keys` says where things live, `etcd` talks to it."""

from . import keys
from .etcd import Store

__all__ = ["Store", "keys"]
