"""`prepare` against the real Docker Engine."""

import pytest
from docker.types import IPAMConfig, IPAMPool

from bottle.backend import PreflightReport
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.addressing import ipv4_subnets
from bottle.manifest import parse_manifest
from bottle.state import StateStore
from tests.integration.conftest import TEST_LABEL

REPORT = PreflightReport(backend="smolmachines", checks=[])


@pytest.fixture
def manifest(slug):
    return parse_manifest({"name": slug, "agent": {"image": "debian:bookworm"}})


@pytest.fixture
def state(tmp_path):
    return StateStore(tmp_path / "state")


def test_the_network_has_exactly_the_planned_subnet_gateway_and_labels(engine, manifest, state):
    backend = SmolmachinesBackend()
    plan = backend.prepare(manifest, docker=engine, state=state, preflight=REPORT)
    network = engine.networks.get(plan.network_id)
    assert network.name == plan.network_name
    assert network.attrs["Driver"] == "bridge"
    assert network.attrs["IPAM"]["Config"] == [{"Subnet": str(plan.bundle_subnet), "Gateway": str(plan.bundle_gateway)}]
    assert network.attrs["Labels"] == {
        "bottle.managed": "true",
        "bottle.slug": manifest.slug,
        "bottle.backend": "smolmachines",
        "bottle.owner": state.owner(),
    }
    assert plan.bundle_ip == plan.bundle_subnet.network_address + 2


def test_a_foreign_network_on_the_derived_subnet_is_probed_past(engine, manifest, slug, state):
    backend = SmolmachinesBackend()
    derived = backend.plan(manifest, docker=engine, state=state, preflight=REPORT).bundle_subnet
    engine.networks.create(
        f"{slug}-foreign", ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(derived))]), labels={TEST_LABEL: slug}
    )
    plan = backend.prepare(manifest, docker=engine, state=state, preflight=REPORT)
    assert plan.bundle_subnet != derived
    assert ipv4_subnets(engine.networks.get(plan.network_id).attrs) == [plan.bundle_subnet]


def test_a_second_prepare_adopts_the_network(engine, manifest, slug, state):
    backend = SmolmachinesBackend()
    first = backend.prepare(manifest, docker=engine, state=state, preflight=REPORT)
    second = backend.prepare(manifest, docker=engine, state=state, preflight=REPORT)
    assert second == first
    assert [n.id for n in engine.networks.list(filters={"label": [f"bottle.slug={slug}"]})] == [first.network_id]
