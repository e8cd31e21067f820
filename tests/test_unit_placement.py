"""Placement and port allocation: pure functions over hosts and members."""

import pytest

from dbplane.controlplane.placement import allocate_ports, choose_host
from dbplane.errors import CapacityError
from dbplane.models import Host, MemberSpec

pytestmark = pytest.mark.unit

HOSTS = [Host(name=f"host-{z}", zone=z, address="127.0.0.1", data_dir="/x") for z in "abc"]


def member(name, host, kind="primary_candidate", db="db"):
    zone = host[-1]
    return MemberSpec(name=name, database=db, host=host, zone=zone, address="127.0.0.1",
                      pg_port=1, api_port=2, kind=kind)


def test_standby_goes_to_another_zone():
    first = member("db-1", "host-b")
    chosen = choose_host(HOSTS, [first], [first], "primary_candidate")
    assert chosen.zone != "b"


def test_replicas_spread_over_zones_with_fewest_members():
    ms = [member("db-1", "host-a"), member("db-2", "host-b")]
    assert choose_host(HOSTS, ms, ms, "replica").zone == "c"


def test_first_member_avoids_busy_hosts():
    other = [member("x-1", "host-a", db="x"), member("x-2", "host-b", db="x")]
    assert choose_host(HOSTS, other, [], "primary_candidate").name == "host-c"


def test_multi_az_refused_with_one_zone():
    one_zone = [HOSTS[0]]
    first = member("db-1", "host-a")
    with pytest.raises(CapacityError) as e:
        choose_host(one_zone, [first], [first], "primary_candidate")
    assert e.value.code == "not_enough_zones"
    assert "--no-multi-az" in e.value.hint


def test_requested_zone_without_agent():
    with pytest.raises(CapacityError) as e:
        choose_host(HOSTS, [], [], "replica", zone="z")
    assert e.value.code == "zone_unavailable"
    assert "a, b, c" in e.value.message


def test_no_hosts():
    with pytest.raises(CapacityError) as e:
        choose_host([], [], [], "primary_candidate")
    assert e.value.code == "no_hosts"


def test_ports_skip_taken_and_busy():
    assert allocate_ports({100, 101}, 100, 110, 2, is_free=lambda p: p != 102) == [103, 104]


def test_ports_exhausted():
    with pytest.raises(CapacityError) as e:
        allocate_ports({100, 101}, 100, 102, 2)
    assert e.value.code == "no_ports"
