import ipaddress
import socket

import pytest

from bottle.backends.smolmachines.smolvm import Smolvm, find
from bottle.state import StateStore


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Unit tests may talk to loopback and unix sockets only; anything else fails the test loudly."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                allowed = ipaddress.ip_address(host).is_loopback
            except ValueError:
                allowed = host == "localhost"
            if not allowed:
                raise AssertionError(f"a unit test tried to connect to {address}; unit tests stay on loopback")

    def connect(sock, address):
        check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture
def real_smolvm(tmp_path, monkeypatch) -> Smolvm:
    """The real smolvm of the smolmachines wheel (a test dependency), with its own state directory.

    It answers everything that does not boot a VM; bottle finds it as a user's machine would.
    """
    monkeypatch.delenv("BOTTLE_SMOLVM")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("BOTTLE_SMOLVM_STATE_DIR", str(tmp_path / "smolvm-state"))
    found = find(StateStore())
    if found is None:
        pytest.fail("the smolmachines wheel is not installed: pip install -e '.[test]'")
    return found
