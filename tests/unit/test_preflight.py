import os

import pytest

from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines import preflight as checks
from bottle.errors import PreflightFailed
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.testing import FakeDocker


@pytest.fixture
def smolvm_prints(tmp_path):
    """An executable that prints `output` and exits with `code` for --version, as a Smolvm."""

    def install(output: str, code: int = 0) -> Smolvm:
        script = tmp_path / "smolvm"
        script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\nexit {code}\n")
        script.chmod(0o755)
        return Smolvm(str(script))

    return install


@pytest.mark.parametrize("output", ["smolvm 1.31.0", "smolvm 1.31.5", "smolvm 1.32.2", "smolvm 1.32.9-rc.1"])
def test_a_supported_smolvm_passes_and_its_version_is_recorded(smolvm_prints, output):
    check, version = checks.check_smolvm(smolvm_prints(output))
    assert check.ok, check.detail
    assert version == output.split()[1].split("-")[0]
    assert "supported: 1.31.0 up to 1.32.x" in check.detail


@pytest.mark.parametrize("output", ["smolvm 0.8.0", "smolvm 1.29.1", "smolvm 1.30.9", "smolvm 1.33.0", "smolvm 2.0.0"])
def test_a_smolvm_outside_the_range_fails_naming_it_and_the_fix(smolvm_prints, output):
    check, version = checks.check_smolvm(smolvm_prints(output))
    assert not check.ok
    assert f"is smolvm {output.split()[1]}; bottle supports 1.31.0 up to 1.32.x" in check.detail
    assert "pip install 'bottle[smolvm]'" in check.fix
    assert version == output.split()[1]


@pytest.mark.parametrize(("output", "code"), [("krunvm 1.32.0", 0), ("", 0)])
def test_unparsable_version_output_fails(smolvm_prints, output, code):
    check, version = checks.check_smolvm(smolvm_prints(output, code))
    assert not check.ok and version is None
    assert "not 'smolvm X.Y.Z'" in check.detail


def test_a_failing_version_call_fails(smolvm_prints):
    check, version = checks.check_smolvm(smolvm_prints("smolvm 1.32.2", 3))
    assert (check.ok, version) == (False, None)


def test_missing_smolvm_fails_with_how_to_install():
    check, version = checks.check_smolvm(None)
    assert (check.ok, version) == (False, None)
    assert "smolmachines wheel is not installed" in check.detail and "bottle[smolvm]" in check.fix


def test_the_real_smolvm_of_the_wheel_is_found_and_supported(real_smolvm):
    check, version = checks.check_smolvm(real_smolvm)
    assert check.ok, check.detail
    assert real_smolvm.executable.endswith("/smolvm") and "SMOLVM_LIB_DIR" in real_smolvm.env


def test_settings_bottle_does_not_pass_on_are_named(monkeypatch):
    monkeypatch.setenv("SMOLVM_EGRESS_FLOOR", "strict")
    monkeypatch.setenv("SMOLVM_PUBLISH_ADDR", "0.0.0.0")
    monkeypatch.setenv("SMOLVM_LIB_DIR", "/opt/smol")
    check = checks.check_settings()
    assert check.ok and "not passed on: SMOLVM_EGRESS_FLOOR, SMOLVM_PUBLISH_ADDR" in check.detail


def test_docker_check(mocker):
    assert checks.check_docker(FakeDocker()).detail == "Docker Engine 20.10.24 answers"
    assert not checks.check_docker(None).ok
    broken = FakeDocker()
    mocker.patch.object(broken, "version", side_effect=ConnectionError("refused"))
    assert "did not answer (refused)" in checks.check_docker(broken).detail


def test_kvm_must_exist_and_be_writable(tmp_path, mocker):
    mocker.patch.object(checks.sys, "platform", "linux")
    assert checks.check_platform(str(tmp_path / "kvm")).detail.endswith("does not exist")
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o600)
    assert checks.check_platform(str(device)).ok
    mocker.patch.object(checks.os, "access", return_value=False)
    assert "not writable" in checks.check_platform(str(device)).detail


def test_macos_is_told_plainly_why_it_cannot_work(mocker):
    mocker.patch.object(checks.sys, "platform", "darwin")
    check = checks.check_platform()
    assert not check.ok and "not routable" in check.detail


def test_every_missing_piece_is_reported_at_once(monkeypatch, tmp_path, mocker):
    mocker.patch.object(checks.sys, "platform", "linux")
    mocker.patch.object(checks.os.path, "exists", return_value=False)
    report = SmolmachinesBackend(routes=[]).preflight(docker=None)
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == ["smolvm", "docker", "kvm"]
    message = str(PreflightFailed("smolmachines", report.problems))
    assert message.count("\n  - ") == 3
