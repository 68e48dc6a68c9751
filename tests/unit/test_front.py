"""The front door's routing, on loopback: which connections it hands to mitmproxy, and that mitmproxy then
sees exactly the bytes the agent sent, and the agent exactly one answer to its CONNECT.

mitmproxy is replaced here by a recorder; what the front door carries itself (and so connects upstream)
is tested against real upstreams in tests/integration/test_proxy.py.
"""

import asyncio
import ssl
from ipaddress import ip_address, ip_network

import pytest

from bottle.bundle.addon import BottlePolicy
from bottle.bundle.front import Front, connect_target
from bottle.bundle.policy import BundleConfig, Policy, Rule

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

    async def handle_stream(self, reader, writer) -> None:
        self.received.append(await self._read_and_answer(reader, writer))

    async def handle_tunnel(self, reader, writer, host, port, opened) -> None:
        opened("client-id")
        self.tunnels.append((host, port, await self._read_and_answer(reader, writer)))

    async def _read_and_answer(self, reader, writer) -> bytes:
        data = b""
        while chunk := await reader.read(65536):
            data += chunk
        writer.write(self.answer)
        await writer.drain()
        writer.close()
        return data


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


def test_an_intercepted_tunnel_is_answered_once_and_its_content_goes_to_mitmproxy_with_its_destination():
    connect = b"CONNECT API.example.com.:443 HTTP/1.0\r\n\r\n"
    inside = client_hello("api.example.com")
    received, recorder, audit, addon = through_front([connect + inside[:10], inside[10:]], answer=b"mitmproxy's")
    assert received == b"HTTP/1.0 200 Connection established\r\n\r\n" + b"mitmproxy's"
    assert recorder.tunnels == [("api.example.com", 443, inside)] and recorder.received == []
    assert [(e["method"], e["host"], e["port"], e["decision"]) for e in audit] == [
        ("CONNECT", "api.example.com", 443, "allow")
    ]
    assert addon._tunnels == {"client-id": ("api.example.com", 443)} and not addon._passthrough


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
