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
