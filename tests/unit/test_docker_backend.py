"""The docker backend's decisions that need no Engine: who the agent runs as, and what its container is."""

from types import SimpleNamespace

import pytest

from bottle.backends.docker import launch
from bottle.backends.docker.launch import NOBODY, agent_user
from bottle.cli import _format_audit


def image(user: str):
    return SimpleNamespace(attrs={"Config": {"User": user}})


def plan(**fields):
    return SimpleNamespace(user=None, **fields)


@pytest.mark.parametrize(
    ("image_user", "runs_as"),
    [("", NOBODY), ("root", NOBODY), ("0", NOBODY), ("00", NOBODY), ("0:0", NOBODY), ("1000:0", NOBODY),
     ("node", NOBODY), ("1000", NOBODY), ("١٢:١٢", NOBODY), ("²:1", NOBODY), ("4294967296:1", NOBODY),
     ("1000:1000", "1000:1000")],
)  # fmt: skip
def test_as_root_the_agent_takes_the_images_user_only_if_it_is_a_numeric_non_root_one(monkeypatch, image_user, runs_as):
    monkeypatch.setattr(launch.os, "getuid", lambda: 0)
    monkeypatch.setattr(launch.os, "getgid", lambda: 0)
    assert agent_user(plan(), image(image_user)) == runs_as


def test_as_a_user_the_agent_runs_as_you_unless_the_manifest_says_otherwise(monkeypatch):
    monkeypatch.setattr(launch.os, "getuid", lambda: 1234)
    monkeypatch.setattr(launch.os, "getgid", lambda: 99)
    assert agent_user(plan(), image("0")) == "1234:99"
    assert agent_user(SimpleNamespace(user="2000:2000"), image("")) == "2000:2000"


def test_audit_fields_cannot_draw_on_the_terminal():
    line = _format_audit({"time": "t", "decision": "deny", "method": "G\x1bET", "host": "h", "port": 1,
                          "path": "/\x1b[1A\x1b[2K\x07\u202e", "reason": "r\n"})  # fmt: skip
    assert line == "t  DENY   G\\x1bET h:1/\\x1b[1A\\x1b[2K\\x07\\u202e  r\\n"
    assert all(c.isprintable() for c in line)


def test_the_host_side_job_sets_both_settings_and_refuses_a_bad_interface_name(tmp_path):
    from bottle.bundle.noroute import rp_filter

    for family, name in (("ipv4", "rp_filter"), ("ipv6", "disable_ipv6")):
        (tmp_path / family / "conf" / "br-0123456789ab").mkdir(parents=True)
        (tmp_path / family / "conf" / "br-0123456789ab" / name).write_text("0\n")
    assert rp_filter("br-0123456789ab", tmp_path) is None
    assert (tmp_path / "ipv4/conf/br-0123456789ab/rp_filter").read_text() == "1\n"
    assert (tmp_path / "ipv6/conf/br-0123456789ab/disable_ipv6").read_text() == "1\n"
    assert rp_filter("../../all", tmp_path) == "'../../all' is not an interface name"
    assert rp_filter("br-missing", tmp_path).startswith("cannot set ")


def test_an_adopted_agent_network_that_gives_the_host_an_address_is_refused(tmp_path):
    from bottle.backends.docker import DockerBackend
    from bottle.errors import BottleError
    from bottle.manifest import parse_manifest
    from bottle.state import StateStore
    from bottle.testing import FakeDocker

    fake, state = FakeDocker(), StateStore(tmp_path / "state")
    backend = DockerBackend(routes=[])
    manifest = parse_manifest({"name": "adopt", "backend": "docker", "agent": {"image": "a:1"}})
    report = backend.preflight(docker=fake)
    plan = backend.prepare(manifest, docker=fake, state=state, preflight=report)
    fake.engine.find_network(plan.network_id)["Options"] = {}  # as a network made without inhibit_ipv4
    with pytest.raises(BottleError, match="gives the host an address on it"):
        backend.prepare(manifest, docker=fake, state=state, preflight=report)
