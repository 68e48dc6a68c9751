"""FakeDocker must answer as the real Engine does: the same script, run against both, gives the same results."""

import docker
from docker.types import IPAMConfig, IPAMPool

from bottle.backends.smolmachines.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
from bottle.testing import FakeDocker
from tests.integration.conftest import TEST_LABEL


def outcome(call):
    try:
        return ("ok", call())
    except docker.errors.APIError as exc:
        return (type(exc).__name__, exc.status_code, exc.explanation)


def script(client: docker.DockerClient, slug: str, subnet: str) -> list:
    def ipam(sub, gateway=None):
        return IPAMConfig(pool_configs=[IPAMPool(subnet=sub, gateway=gateway)])

    labels = {TEST_LABEL: slug}
    name = f"{slug}-a"
    created = client.networks.create(name, ipam=ipam(subnet), labels=labels, check_duplicate=True)
    results = [
        (created.name, created.attrs["IPAM"]["Config"], created.attrs["Labels"], created.attrs["Driver"]),
        outcome(lambda: client.networks.create(name, ipam=ipam(subnet), check_duplicate=True)),
        outcome(lambda: client.networks.create(f"{slug}-b", ipam=ipam(subnet), labels=labels)),
        outcome(lambda: client.networks.create(f"{slug}-c", ipam=ipam("garbage"), labels=labels)),
        outcome(lambda: client.networks.create(f"{slug}-d", ipam=ipam("10.255.255.0/33"), labels=labels)),
        outcome(lambda: client.networks.create(f"{slug}-e", ipam=ipam(subnet.replace(".0/24", ".0/25"), "1.2.3.4"))),
        [n.name for n in client.networks.list(filters={"label": f"{TEST_LABEL}={slug}"})],
        [n.name for n in client.networks.list(filters={"name": f"^{slug}-a$"})],
        outcome(lambda: client.networks.list(filters={"colour": "red"})),
        client.networks.get(name).attrs["Labels"],
        client.networks.get(created.id[:12]).name,
        outcome(lambda: client.networks.get("bridge").remove()),
    ]
    created.remove()
    gone = outcome(created.remove)
    results.append(gone[:2] + (gone[2].replace(created.id, "<id>"),))
    results.append(outcome(lambda: client.networks.get(f"{slug}-missing")))
    results.append(ipv4_subnets(client.networks.get("bridge").attrs))
    return results


def test_fake_docker_answers_like_the_real_engine(engine, slug):
    taken = [s for n in engine.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = str(derive_subnet(slug, DEFAULT_POOL, taken))
    real = script(engine, slug, subnet)
    assert script(FakeDocker(), slug, subnet) == real
    assert real[1] == ("APIError", 409, f"network with name {slug}-a already exists")  # the script did check errors
