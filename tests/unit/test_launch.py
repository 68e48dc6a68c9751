import signal

import pytest

from bottle.backend import BottleStatus
from bottle.sidecar import _drift
from bottle.undo import Undo


def test_undo_runs_newest_first_and_reports_what_it_could_not_undo():
    done = []

    def fail():
        raise RuntimeError("busy")

    undo = Undo()
    undo.push("network", lambda: done.append("network"))
    undo.push("container", fail)
    undo.push("machine", lambda: done.append("machine"))
    assert undo.run() == ["container (busy)"]
    assert done == ["machine", "network"]
    assert undo.run() == []  # each action runs once


def test_undo_cannot_be_interrupted_by_a_second_ctrl_c():
    seen = []
    undo = Undo()
    undo.push("probe", lambda: seen.append(signal.getsignal(signal.SIGINT)))
    undo.run()
    assert seen == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def status(parts, name="b"):
    return BottleStatus(slug="b", name=name, backend="x", address=None, parts=parts, drift=_drift(parts, has_plan=name is not None))


@pytest.mark.parametrize(
    ("parts", "state", "drift"),
    [
        ({"network": "present", "bundle": "running", "machine": "running"}, "running", []),
        ({"network": "missing", "bundle": "missing", "machine": "missing"}, "down", []),
        (
            {"network": "present", "bundle": "running", "machine": "missing"},
            "partial",
            ["machine not up while bundle, network is (`bottle up` repairs it)"],
        ),
        (
            {"network": "present", "bundle": "exited", "machine": "stopped"},
            "partial",
            ["bundle, machine not up while network is (`bottle up` repairs it)"],
        ),
    ],
)
def test_status_and_drift(parts, state, drift):
    assert (status(parts).state, status(parts).drift) == (state, drift)


def test_resources_without_a_plan_are_orphans():
    orphan = status({"network": "present", "bundle": "missing", "machine": "missing"}, name=None)
    assert orphan.orphan and orphan.state == "orphan"
    assert "bottle gc" in orphan.drift[0]


def test_a_container_removed_while_bottle_lists_them_is_not_an_error(tmp_path, mocker):
    """`docker.containers.list` inspects each container it lists; one removed in between (another
    `down`, a test's cleanup) made `ls` and `gc` fail with the Engine's 404."""
    from bottle import sidecar
    from bottle.backend import labels
    from bottle.backends.docker.plan import DockerBottlePlan
    from bottle.state import StateStore
    from bottle.testing import FakeDocker

    client, state = FakeDocker(), StateStore(tmp_path / "state")
    owner = state.owner(create=True)
    client.engine.add_image("img")
    for name in ("bottle-a-bundle", "bottle-b-bundle"):
        slug = name.split("-")[1]
        client.containers.create("img", name=name, labels=labels(slug, "docker", owner) | {"bottle.role": "bundle"})
    gone = next(i for i, c in client.engine.containers.items() if c["Name"] == "/bottle-a-bundle")
    real_inspect = client.api.inspect_container

    def inspect_after_removal(ref, *args, **kwargs):
        if ref == gone:
            client.engine.containers.pop(gone, None)  # removed between the list and the inspect
        return real_inspect(ref, *args, **kwargs)

    mocker.patch.object(client.api, "inspect_container", side_effect=inspect_after_removal)
    found = sidecar.survey_bottles(client, state, "docker", DockerBottlePlan)
    assert found.parts == {"b": {"bundle": "created"}}
