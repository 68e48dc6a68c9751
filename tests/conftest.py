import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep every test's bottle state (and subnet pool setting) out of the user's real ones."""
    monkeypatch.setenv("BOTTLE_HOME", str(tmp_path / "bottle-home"))
    monkeypatch.delenv("BOTTLE_SUBNET_POOL", raising=False)
    for name in ("BOTTLE_SMOLVM_STATE_DIR", "BOTTLE_READY_TIMEOUT", "BOTTLE_PROBE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    # Whatever smolvm this machine has (on PATH, or the smolmachines wheel), a test uses the one it names.
    monkeypatch.setenv("BOTTLE_SMOLVM", str(tmp_path / "no-smolvm-here"))
    # Nor the user's clusters: a test that wants one points KUBECONFIG at the test API server's.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig-here"))
