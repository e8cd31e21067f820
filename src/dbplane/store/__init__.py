"""etcd: the single source of truth. `keys` says where things live, `etcd` talks to it."""

from .etcd import Store
from . import keys

__all__ = ["Store", "keys"]
