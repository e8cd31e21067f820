"""Shared fixtures: one real platform (etcd, controller, API, three agents, Patroni,
PostgreSQL) for the whole test session; tests use their own database names."""

from __future__ import annotations

import pytest

from platform_helpers import Platform, new_data_root


@pytest.fixture(scope="session")
def platform():
    p = Platform(new_data_root())
    p.up()
    yield p
    p.destroy()
