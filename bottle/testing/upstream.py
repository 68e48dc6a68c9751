"""Test doubles around the bundle: an echoing upstream (HTTP or HTTPS) and a proxy run in a thread.

Both serve on addresses the test chooses. The upstream answers every request with the headers it
received, as JSON, so a test can see exactly what the bundle sent on.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from bottle.bundle.ca import create_ca


class _Echo(BaseHTTPRequestHandler):
    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.dumps(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body_bytes": length,
             "peer_port": self.client_address[1]}  # which connection it came on
        ).encode()  # fmt: skip
        if length:
            self.rfile.read(length)
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _echo

    def log_message(self, *args: Any) -> None:
        pass


class _KeepAlive(_Echo):
    protocol_version = "HTTP/1.1"  # keeps a connection open for the next request, as most servers do
    disable_nagle_algorithm = True  # the body leaves with the headers, not a delayed ACK (40 ms) later


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections that arrive together, as a burst of clients does
    daemon_threads = True
    connections = requests = 0  # accepted and answered so far

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)


def issue_certificate(ca_key_pem: bytes, ca_cert_pem: bytes, names: list[str]) -> tuple[bytes, bytes]:
    """A server certificate for `names`, signed by the given CA: (key PEM, cert PEM)."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@contextmanager
def echo_server(host: str, *, tls_names: list[str] | None = None, workdir: Path | None = None,
                keep_alive: bool = False, port: int = 0, ca: tuple[bytes, bytes] | None = None) -> Iterator[dict]:  # fmt: skip
    """Serve the echo upstream on `host` (`port`, or a free one); with `tls_names`, over TLS from `ca` (key,
    certificate) or a fresh test CA; with `keep_alive`, HTTP/1.1 keeping connections open (otherwise
    HTTP/1.0, one request a connection).

    Yields {"port": ..., "ca": path of the CA certificate that signed it, "ca_pair": its key and certificate
    (TLS only), "server": the server, whose `connections` and `requests` count what it accepted and answered}.
    """
    server = _Server((host, port), _KeepAlive if keep_alive else _Echo)
    info: dict[str, Any] = {"port": server.server_address[1], "server": server}
    if tls_names:
        assert workdir is not None
        ca_key, ca_cert = ca or create_ca("bottle test upstream CA")
        info["ca_pair"] = (ca_key, ca_cert)
        key, cert = issue_certificate(ca_key, ca_cert, tls_names)
        (workdir / "upstream.pem").write_bytes(cert + key)
        (workdir / "upstream-ca.pem").write_bytes(ca_cert)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(workdir / "upstream.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        info["ca"] = workdir / "upstream-ca.pem"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield info
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def running_bundle(config, secrets: dict[str, str], ca_file: Path, resolver, audit, upstream_ca=None) -> Iterator[int]:
    """Run the bundle's proxy on 127.0.0.1 (a free port) in a thread; yield its port."""
    from bottle.bundle.__main__ import new_loop, serve

    with_port = config.model_copy(update={"port": free_port()})
    loop = new_loop()  # the loop the bundle runs on, so the tests see what it does
    task: list[asyncio.Task] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(serve(with_port, secrets, ca_file, listen_host="127.0.0.1", resolver=resolver,
                                           audit=audit, upstream_ca=upstream_ca)))  # fmt: skip
        try:
            loop.run_until_complete(task[0])
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not _accepts(with_port.port):
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the bundle's proxy did not start")
        time.sleep(0.05)
    try:
        yield with_port.port
    finally:
        loop.call_soon_threadsafe(task[0].cancel)
        thread.join(10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """A port on `host` that nothing listens on; with `udp`, free for both TCP and UDP (as DNS needs)."""
    while True:
        with socket.socket() as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
                try:
                    datagram.bind((host, port))
                except OSError:
                    continue
                return port


def gateway_of(network_attrs: dict) -> str:
    """The host's own address on a docker bridge network (its gateway)."""
    config = network_attrs["IPAM"]["Config"][0]
    return config.get("Gateway") or str(ipaddress.ip_network(config["Subnet"]).network_address + 1)
