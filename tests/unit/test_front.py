"""The front door's routing, on loopback: which connections it hands to mitmproxy, and that mitmproxy then
sees exactly the bytes the agent sent, and the agent exactly one answer to its CONNECT.

mitmproxy is replaced here by a recorder; what the front door carries itself (and so connects upstream)
is tested against real upstreams in tests/integration/test_proxy.py.
"""

import asyncio
import ssl
import tempfile
from ipaddress import ip_address, ip_network

import pytest

from bottle.bundle.addon import BottlePolicy
from bottle.bundle.ca import create_ca
from bottle.bundle.front import AgentTLS, Front, connect_target
from bottle.bundle.policy import BundleConfig, Policy, Rule
from bottle.testing.upstream import issue_certificate

TABLE = {"pass.example.com": "93.184.216.34", "api.example.com": "93.184.216.35", "inward.example.com": "127.0.0.1"}
CONNECT = b"CONNECT pass.example.com:443 HTTP/1.1\r\nHost: pass.example.com:443\r\n\r\n"
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nHost: pass.example.com:443", ("pass.example.com", 443, b"HTTP/1.1")),
        (b"CONNECT Pass.Example.COM.:443 HTTP/1.0", ("pass.example.com", 443, b"HTTP/1.0")),
        (b"CONNECT [2001:db8::1]:443 HTTP/1.1", ("2001:db8::1", 443, b"HTTP/1.1")),
        (b"connect pass.example.com:443 HTTP/1.1", None),  # methods are case-sensitive
        (b"CONNECT pass.example.com HTTP/1.1", None),  # no port
        (b"CONNECT pass.example.com:443 HTTP/2.0", None),
        (b"CONNECT  pass.example.com:443 HTTP/1.1", None),
        (b"CONNECT https://pass.example.com:443/ HTTP/1.1", None),
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nHost : x", None),
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nX-A: 1\r\n folded", None),
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nX-A: \x00", None),
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nContent-Length: 5", None),
        (b"CONNECT pass.example.com:443 HTTP/1.1\r\nTransfer-Encoding: chunked", None),
        (b"CONNECT p\xc3\xa4ss.example.com:443 HTTP/1.1", None),
        (b"CONNECT pass.example.com:443\n HTTP/1.1", None),  # mitmproxy's own check lets a LF end a label
        (b"CONNECT ab\n.pass.example.com:443 HTTP/1.1", None),
        (b"CONNECT user@pass.example.com:443 HTTP/1.1", None),
        (b"CONNECT pass.example.com:99999 HTTP/1.1", None),
        (b"GET http://pass.example.com/ HTTP/1.1", None),
    ],
)
def test_only_a_plain_connect_head_is_read_as_one(head, expected):
    assert connect_target(head) == expected


class Recorder:
    """Stands in for mitmproxy: reads each connection (or tunnel) it is handed to its end, then answers."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.received: list[bytes] = []  # each connection handed over from its first byte
        self.tunnels: list[tuple[str, int, bytes]] = []  # each tunnel's host, port and content
        self.decrypted: list[tuple[str, int, str | None, bytes]] = []  # ... server name and content, TLS terminated

    async def handle_stream(self, reader, writer) -> None:
        self.received.append(await self._read_and_answer(reader, writer))

    async def handle_tunnel(self, reader, writer, host, port, opened) -> None:
        opened("client-id")
        self.tunnels.append((host, port, await self._read_and_answer(reader, writer)))

    def tls_context(self, host: str) -> ssl.SSLContext:
        key, cert = issue_certificate(*CA, [host])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.NamedTemporaryFile(suffix=".pem") as pem:
            pem.write(cert + key)
            pem.flush()
            context.load_cert_chain(pem.name)
        return context

    async def handle_decrypted(self, agent, host, port, hello, opened) -> None:
        opened("client-id")
        data = b""
        while not data.endswith(b"\r\n\r\n") and (chunk := await agent.read(65536)):  # a request head
            data += chunk
        self.decrypted.append((host, port, hello.sni, data))
        agent.write(self.answer)
        await agent.drain()
        agent.close()

    async def _read_and_answer(self, reader, writer) -> bytes:
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
        writer.write(self.answer)
        await writer.drain()
        writer.close()
        return data


CA = create_ca("bottle test bundle CA")


def client_hello(server_name: str | None) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def through_front(packets: list[bytes], *, answer: bytes = b"", clients=(), wait_for_answer=False):
    """Send `packets` to a front door on loopback (pausing between them), half-close, and read everything back.

    Returns (what the agent received, the recorder, the audit log, the addon). With `wait_for_answer`, the
    second packet goes only after the front door answered the first.
    """
    config = BundleConfig(
        allow=[Rule(host="pass.example.com", ports=[443], intercept=False), Rule(host="api.example.com"),
               Rule(host="inward.example.com", intercept=False)],
        clients=list(clients),
    )  # fmt: skip
    audit: list[dict] = []
    addon = BottlePolicy(Policy(config, lambda host, port: [ip_address(TABLE[host])]), {}, audit.append)
    recorder = Recorder(answer)

    async def main() -> bytes:
        server = await asyncio.start_server(Front(addon, recorder).handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            received = b""
            for index, packet in enumerate(packets):
                writer.write(packet)
                await writer.drain()
                if index == 0 and wait_for_answer:
                    received += await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.05)
            writer.write_eof()
            received += await reader.read()
            writer.close()
            return received

    received = asyncio.run(main())
    return received, recorder, audit, addon


@pytest.mark.parametrize(
    "packets",
    [
        [b"GET http://pass.example.com/ HTTP/1.1\r\nHost: pass.example.com\r\n\r\n"],
        [b"CONNECT pass.example.com:8443 HTTP/1.1\r\n\r\n"],  # a port the rule does not allow
        [b"CONNECT elsewhere.example.com:443 HTTP/1.1\r\n\r\n"],  # no rule
        [b"CONNECT inward.example.com:443 HTTP/1.1\r\n\r\n"],  # refused by its address
        [b"CONNECT pass.example.com:53 HTTP/1.1\r\n\r\n"],
        [b"CONNECT pass.exam", b"ple.com:443 HTTP/1.1\r\n\r\n"],  # a head split across packets
        [b"CONNECT pass.example.com:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"],
        [b"\x16\x03\x01\x02\x00"],
        [],
    ],
)
def test_whatever_the_front_door_does_not_answer_reaches_mitmproxy_byte_for_byte(packets):
    received, recorder, audit, _ = through_front(packets, answer=b"mitmproxy's answer")
    assert recorder.received == [b"".join(packets)] and recorder.tunnels == []
    assert received == b"mitmproxy's answer" and audit == []


def test_a_client_that_is_not_the_agent_goes_to_mitmproxy_before_it_sends_a_byte():
    # mitmproxy refuses and logs it at once (tests/integration/test_proxy_clients.py); nothing waits for it to talk.
    config = BundleConfig(allow=[Rule(host="pass.example.com", intercept=False)], clients=[ip_network("10.99.0.0/16")])
    addon = BottlePolicy(Policy(config, lambda host, port: [ip_address(TABLE[host])]), {}, lambda entry: None)
    handed = []

    class Refuses:
        async def handle_stream(self, reader, writer) -> None:
            handed.append(writer.get_extra_info("peername"))
            writer.close()

    async def main() -> bytes:
        server = await asyncio.start_server(Front(addon, Refuses()).handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            answer = await asyncio.wait_for(reader.read(), 5)  # sends nothing; closed all the same
            writer.close()
            return answer

    assert asyncio.run(main()) == b"" and len(handed) == 1


def through_tls(connect: bytes, server_name: str | None, cafile_pem: bytes, request: bytes = b"GET / HTTP/1.1\r\n\r\n"):
    """CONNECT through a front door, then TLS to `server_name` trusting `cafile_pem`, send `request` and read
    until the end. Returns (the CONNECT's answer, what came back inside TLS or the TLS error, recorder, audit,
    addon)."""
    config = BundleConfig(allow=[Rule(host="api.example.com")])
    audit: list[dict] = []
    addon = BottlePolicy(Policy(config, lambda host, port: [ip_address(TABLE[host])]), {}, audit.append)
    recorder = Recorder(b"HTTP/1.1 204 No Content\r\n\r\n")
    client = ssl.create_default_context(cadata=cafile_pem.decode())
    client.check_hostname = server_name is not None

    async def main() -> tuple[bytes, bytes | str]:
        server = await asyncio.start_server(Front(addon, recorder).handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            writer.write(connect)
            answer = await reader.readuntil(b"\r\n\r\n")
            try:
                await writer.start_tls(client, server_hostname=server_name)
            except ssl.SSLError as exc:
                inside: bytes | str = exc.reason
                for _ in range(100):  # the front door's side of the failed handshake, and its line
                    if len(audit) > 1:
                        break
                    await asyncio.sleep(0.05)
            else:
                writer.write(request)
                await writer.drain()
                inside = await reader.read()
            writer.close()
            return answer, inside

    answer, inside = asyncio.run(main())
    return answer, inside, recorder, audit, addon


def test_an_intercepted_tunnel_is_answered_once_and_mitmproxy_gets_what_the_agent_sends_inside_the_bundles_tls():
    answer, inside, recorder, audit, addon = through_tls(b"CONNECT API.example.com.:443 HTTP/1.0\r\n\r\n",
                                                         "api.example.com", CA[1])  # fmt: skip
    assert answer == b"HTTP/1.0 200 Connection established\r\n\r\n"
    assert inside == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert recorder.decrypted == [("api.example.com", 443, "api.example.com", b"GET / HTTP/1.1\r\n\r\n")]
    assert recorder.tunnels == recorder.received == []
    assert [(e["method"], e["host"], e["port"], e["decision"]) for e in audit] == [
        ("CONNECT", "api.example.com", 443, "allow")
    ]
    assert addon._tunnels == {"client-id": ("api.example.com", 443)} and not addon._passthrough


def test_an_agent_whose_tls_handshake_with_the_bundle_fails_gets_one_line_for_it_and_mitmproxy_nothing():
    _, inside, recorder, audit, _ = through_tls(b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n", "api.example.com",
                                                create_ca("another CA")[1])  # fmt: skip
    assert inside == "CERTIFICATE_VERIFY_FAILED"
    assert recorder.decrypted == recorder.tunnels == recorder.received == []
    assert [(e["method"], e["host"], e["port"], e["decision"]) for e in audit] == [
        ("CONNECT", "api.example.com", 443, "allow"), ("TLS", "api.example.com", 443, "error")
    ]
    assert audit[1]["reason"].startswith("the agent's TLS handshake with the bundle failed")


def test_an_agent_that_leaves_or_idles_mid_handshake_gets_one_line_for_it(monkeypatch):
    import bottle.bundle.front

    monkeypatch.setattr(bottle.bundle.front, "IDLE_TIMEOUT", 0.3)
    connect = b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n"
    hello = client_hello("api.example.com")
    for leaves in (True, False):
        config = BundleConfig(allow=[Rule(host="api.example.com")])
        audit: list[dict] = []
        addon = BottlePolicy(Policy(config, lambda host, port: [ip_address(TABLE[host])]), {}, audit.append)
        recorder = Recorder(b"")

        async def main() -> bytes:
            server = await asyncio.start_server(Front(addon, recorder).handle, "127.0.0.1", 0)
            async with server:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
                for packet in (connect, hello):
                    writer.write(packet)
                    await asyncio.sleep(0.05)
                if leaves:
                    writer.write_eof()
                received = await asyncio.wait_for(reader.read(), 5)  # idling: closed by the front door in time
                writer.close()
                return received

        assert asyncio.run(main()).startswith(OK)
        assert [(e["method"], e["decision"]) for e in audit] == [("CONNECT", "allow"), ("TLS", "error")]
        assert recorder.decrypted == recorder.tunnels == []


@pytest.mark.parametrize("inside", [client_hello("other.example.com"), client_hello(None),
                                    b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n"])  # fmt: skip
def test_an_intercepted_tunnel_for_another_server_name_or_none_or_without_tls_goes_to_mitmproxy_as_it_is(inside):
    # There mitmproxy's TLS layer (or its HTTP one) meets it, and the addon answers each request with a 403.
    connect = b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n"
    received, recorder, audit, addon = through_front([connect, inside], answer=b"403s", wait_for_answer=True)
    assert received == OK + b"403s" and recorder.tunnels == [("api.example.com", 443, inside)]
    assert recorder.decrypted == [] and addon._tunnels == {"client-id": ("api.example.com", 443)}
    assert [(e["method"], e["decision"]) for e in audit] == [("CONNECT", "allow")] and not addon._passthrough


@pytest.mark.parametrize("inside", [client_hello("other.example.com"), client_hello(None),
                                    b"GET / HTTP/1.1\r\nHost: pass.example.com\r\n\r\n"])  # fmt: skip
def test_a_passthrough_tunnel_with_another_server_name_or_no_tls_goes_to_mitmproxy_as_a_passthrough_tunnel(inside):
    # There the addon intercepts it and answers each request in it with a 403 (tests/integration/test_proxy.py).
    received, recorder, audit, addon = through_front([CONNECT, inside], answer=b"403s", wait_for_answer=True)
    assert received == OK + b"403s" and recorder.tunnels == [("pass.example.com", 443, inside)]
    assert [(e["method"], e["decision"]) for e in audit] == [("CONNECT", "allow")]
    assert addon._passthrough == {"client-id"}


def test_a_client_hello_that_never_completes_is_handed_over_once_it_is_too_long():
    record = b"\x16\x03\x01\xff\xff" + b"\x01" * 70000  # announces more than it ever sends
    received, recorder, _, _ = through_front([CONNECT, record], wait_for_answer=True)
    assert received == OK and recorder.tunnels == [("pass.example.com", 443, record)]


def test_an_agent_that_leaves_before_its_client_hello_gets_its_tunnel_logged_once():
    received, recorder, audit, _ = through_front([CONNECT], wait_for_answer=True)
    assert received == OK and recorder.received == recorder.tunnels == []
    assert [(e["method"], e["host"], e["decision"], e["status"]) for e in audit] == [
        ("CONNECT", "pass.example.com", "allow", 200)
    ]


def test_the_agents_tls_gives_mitmproxy_all_the_plaintext_its_records_hold_in_one_read():
    """Found by a red team: a request sent one byte a TLS record went to mitmproxy one byte an event, at ten
    times the bundle's CPU of mitmproxy's own TLS layer, which hands on everything it can decrypt at once."""
    request = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n" * 5
    context = Recorder(b"").tls_context("api.example.com")
    client = ssl.create_default_context(cadata=CA[1].decode())

    async def main() -> list[bytes]:
        reads: list[bytes] = []
        done = asyncio.Event()

        async def serve(reader, writer) -> None:
            agent = AgentTLS(context, reader, writer, b"")
            await agent.handshake()
            while sum(map(len, reads)) < len(request):
                reads.append(await agent.read(65536))
            done.set()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = client.wrap_bio(incoming, outgoing, server_hostname="api.example.com")
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    incoming.write(await reader.read(65536))
            for byte in request:
                tls.write(bytes([byte]))  # a record each
            writer.write(outgoing.read())  # all of them in one packet
            await asyncio.wait_for(done.wait(), 5)
            writer.close()
        return reads

    assert asyncio.run(main()) == [request]
