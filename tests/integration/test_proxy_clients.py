"""The bundle's proxy for the docker backend's agent network alone, on loopback.

A module of its own: it runs a second proxy in this process, and mitmproxy keeps its options and master
in module globals, which would change under test_proxy.py's module-wide proxy.
"""

import socket
import time
from ipaddress import ip_address, ip_network

from bottle.bundle.ca import CA_FILE, create_ca
from bottle.bundle.policy import BundleConfig, Rule
from bottle.testing.upstream import free_port, running_bundle


def test_only_the_agents_network_may_use_the_proxy(tmp_path):
    """A bundle told its clients (the docker backend's agent network) closes anyone else's connection
    before reading it, and says so once in the audit log: no host user gets a credential added."""
    key, cert = create_ca("bottle test bundle CA")
    (tmp_path / CA_FILE).write_bytes(key + cert)
    audit: list[dict] = []
    config = BundleConfig(allow=[Rule(host="upstream.test", ports=[443]), Rule(host="pass.test", intercept=False)],
                          clients=[ip_network("10.99.0.0/16")], dns_port=free_port(udp=True))  # fmt: skip
    with running_bundle(config, {}, tmp_path / CA_FILE, lambda h, p: [ip_address("10.99.1.1")], audit.append) as port:
        for host in ("upstream.test", "pass.test"):  # intercepted, and relayed by the front door for the agent
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
                try:
                    answer = conn.recv(1024)
                except ConnectionResetError:
                    answer = b""
            assert answer == b""
        deadline = time.monotonic() + 5
        while not audit and time.monotonic() < deadline:
            time.sleep(0.05)
    # One line per connection (the readiness check's too), each a refusal; never a request.
    assert audit and {(e["event"], e["decision"], e["client"]) for e in audit} == {("client", "refused", "127.0.0.1")}
