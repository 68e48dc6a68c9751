"""FakeDocker must answer as the real Engine does: the same script, run against both, gives the same results."""

import docker
from docker.types import IPAMConfig, IPAMPool

from bottle.addressing import DEFAULT_POOL, derive_subnet, host_routes, ipv4_subnets
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


def container_script(client: docker.DockerClient, slug: str, subnet: str, image: str) -> list:
    """Containers on a pinned IP: the calls bottle's launcher makes, and the errors it can meet."""
    network = client.networks.create(
        f"{slug}-n", ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=subnet)]), labels={TEST_LABEL: slug}
    )
    ip = subnet.replace(".0/24", ".2")

    def create(name, address):
        endpoint = {network.name: client.api.create_endpoint_config(ipv4_address=address)}
        return client.containers.create(
            image, name=name, network=network.name, networking_config=endpoint, labels={TEST_LABEL: slug}
        )

    first = create(f"{slug}-a", ip)
    first.start()
    first.reload()
    same_ip, elsewhere = create(f"{slug}-b", ip), create(f"{slug}-c", "10.255.254.2")
    plain = client.containers.create(image, name=f"{slug}-d", network=network.name, labels={TEST_LABEL: slug})

    def on_network(ref):  # by name every container attached, started or not; by ID the started ones only
        return sorted(c.name for c in client.containers.list(all=True, filters={"network": ref}))

    results = [
        on_network(network.name),
        on_network(network.id),
        (first.status, first.labels, first.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"]),
        tuple(str(part).replace(first.id, "<id>") for part in outcome(lambda: create(f"{slug}-a", ip))),
        outcome(lambda: client.containers.create("bottle-test-bundle:none", name=f"{slug}-x")),
        outcome(same_ip.start),
        outcome(elsewhere.start),
        [(c.name, c.status) for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={slug}"})],
        [c.name for c in client.containers.list(filters={"label": f"{TEST_LABEL}={slug}"})],
        outcome(lambda: client.containers.list(filters={"colour": "red"})),
        outcome(network.remove)[:2],
        outcome(first.remove)[:2],
        first.logs(tail=5),
        outcome(lambda: client.images.get("bottle-test-bundle:none")),
        "runc" in (client.info().get("Runtimes") or {}),
    ]
    # What the docker backend adds: an internal network with driver options, a second network connected
    # at a pinned address before start, and a one-shot container in another's network namespace.
    inner = client.networks.create(
        f"{slug}-i", internal=True, options={"com.docker.network.bridge.inhibit_ipv4": "true"}, labels={TEST_LABEL: slug}
    )
    results.append((inner.attrs["Internal"], inner.attrs["Options"]))
    results.append(outcome(lambda: inner.connect(plain)))
    results.append(tuple(str(p).replace(plain.name, "<name>") for p in outcome(lambda: inner.connect(plain))))
    plain.reload()
    results.append(sorted(plain.attrs["NetworkSettings"]["Networks"]))
    helper = client.containers.create(image, ["true"], network_mode=f"container:{first.id}", labels={TEST_LABEL: slug})
    helper.start()
    results.append(helper.wait(timeout=30))
    for container in (first, same_ip, elsewhere, plain, helper):
        container.remove(force=True)
    results.append(outcome(lambda: client.containers.get(f"{slug}-a")))
    network.remove()
    inner.remove()
    return results


def test_fake_docker_containers_answer_like_the_real_engine(engine, slug, bundle_images):
    taken = [s for n in engine.networks.list() for s in ipv4_subnets(n.attrs)] + host_routes()
    subnet = str(derive_subnet(slug, DEFAULT_POOL, taken))
    image = "bottle-test-bundle:mute"  # runs without listening; its logs are empty, as the fake's are
    real = container_script(engine, slug, subnet, image)
    fake = FakeDocker()
    fake.engine.add_image(image)
    assert container_script(fake, slug, subnet, image) == real
    assert real[5] == ("APIError", 403, "Address already in use")
    assert real[:2] == [[f"{slug}-{x}" for x in "abcd"], [f"{slug}-a"]]  # the script did see the difference
    assert (True, {"com.docker.network.bridge.inhibit_ipv4": "true"}) in real and {"Error": None, "StatusCode": 0} in real
