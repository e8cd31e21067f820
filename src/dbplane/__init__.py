"""dbplane: a self-hosted managed PostgreSQL platform (RDS-like) on Patroni and etcd."""

__version__ = "0.1.0"
