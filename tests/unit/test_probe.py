import socket
import time

from bottle.backends.smolmachines.probe import listener


def test_the_probes_listener_sees_tcp_and_udp_on_one_port():
    with listener("127.0.0.1") as (port, seen):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"x", ("127.0.0.1", port))
        deadline = time.monotonic() + 3
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(seen) == ["127.0.0.1 (TCP)", "127.0.0.1 (UDP)"]
