import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep every test's bottle state (and subnet pool setting) out of the user's real ones."""
    monkeypatch.setenv("BOTTLE_HOME", str(tmp_path / "bottle-home"))
    monkeypatch.delenv("BOTTLE_SUBNET_POOL", raising=False)
    monkeypatch.delenv("SMOLVM_EGRESS_FLOOR", raising=False)
