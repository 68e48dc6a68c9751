from importlib.metadata import EntryPoint

import pytest

from bottle import registry
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.errors import BackendBroken, BackendNotFound


def entry_point(name, value):
    return EntryPoint(name=name, value=value, group=registry.GROUP)


@pytest.fixture
def installed(mocker):
    def install(*eps):
        mocker.patch("bottle.registry.entry_points", return_value=list(eps))

    return install


def test_smolmachines_is_registered_through_the_entry_point_group():
    assert "smolmachines" in registry.available()
    assert registry.load("smolmachines") is SmolmachinesBackend


def test_the_registry_view_is_read_only():
    with pytest.raises(TypeError):
        registry.available()["x"] = None


def test_an_unknown_backend_lists_the_installed_ones(installed):
    installed(entry_point("smolmachines", "bottle.backends.smolmachines:SmolmachinesBackend"))
    with pytest.raises(BackendNotFound) as info:
        registry.load("firecracker")
    assert "unknown backend 'firecracker'; installed backends: smolmachines" in str(info.value)


def test_two_backends_with_one_name_are_an_error_naming_both(installed):
    installed(entry_point("vm", "pkg_a.backend:A"), entry_point("vm", "pkg_b.backend:B"))
    with pytest.raises(BackendBroken) as info:
        registry.available()
    assert "pkg_a.backend:A" in str(info.value) and "pkg_b.backend:B" in str(info.value)


def test_the_same_entry_point_seen_twice_is_not_a_conflict(installed):
    value = "bottle.backends.smolmachines:SmolmachinesBackend"
    installed(entry_point("smolmachines", value), entry_point("smolmachines", value))
    assert list(registry.available()) == ["smolmachines"]


def test_a_backend_that_fails_to_import_is_named_with_the_reason(installed):
    installed(entry_point("broken", "no_such_module_anywhere:Backend"))
    with pytest.raises(BackendBroken, match="backend 'broken' .* failed to import: No module named"):
        registry.load("broken")


def test_an_entry_point_that_is_not_a_backend_is_refused(installed):
    installed(entry_point("odd", "bottle.plan:BottlePlan"), entry_point("liar", "bottle.backends.smolmachines:SmolmachinesBackend"))
    with pytest.raises(BackendBroken, match="is not a Backend subclass named 'odd'"):
        registry.load("odd")
    with pytest.raises(BackendBroken, match="named 'liar'"):
        registry.load("liar")
