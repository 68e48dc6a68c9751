"""The bundle's DNS refuser: every query REFUSED and logged once, anything else dropped and logged once."""

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bottle.bundle.dns import display_name, listen, refusal
from bottle.testing.upstream import free_port

HEADER = struct.Struct("!HHHHHH")
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)  # EDNS: root name, type OPT, 1232-byte payload, no options
COOKIE_OPT = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 12) + struct.pack("!HH", 10, 8) + b"\x01" * 8


def qname(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return b"".join(bytes([len(label)]) + label for label in raw.split(b".") if label) + b"\x00"


def query(name: str | bytes = "example.com", qtype: int = 1, *, ident: int = 0x1234, flags: int = 0x0100,
          qdcount: int = 1, additional: bytes = b"", arcount: int | None = None) -> bytes:  # fmt: skip
    """A query as a stub resolver sends it (RD set by default)."""
    if arcount is None:
        arcount = 1 if additional else 0
    header = HEADER.pack(ident, flags, qdcount, 0, 0, arcount)
    return header + qname(name) + struct.pack("!HH", qtype, 1) + additional


def question(name: str | bytes = "example.com", qtype: int = 1) -> bytes:
    return qname(name) + struct.pack("!HH", qtype, 1)


# -- refusal() on queries built by hand -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "qtype"), [("example.com", 1), ("api.anthropic.com", 28), ("x.y.z.example", 16)])
@pytest.mark.parametrize("additional", [b"", OPT, COOKIE_OPT])
def test_a_query_is_refused_with_its_id_and_question_and_nothing_else(name, qtype, additional):
    reply = refusal(query(name, qtype, ident=0xBEEF, additional=additional))
    assert reply == HEADER.pack(0xBEEF, 0x8105, 1, 0, 0, 0) + question(name, qtype)  # QR, RD, REFUSED; no OPT


def test_only_the_opcode_and_rd_are_copied_from_the_query():
    # opcode 2 (STATUS), RD off, and AA, TC, Z, AD, CD set: none of those reach the answer.
    flags = (2 << 11) | 0x0400 | 0x0200 | 0x0040 | 0x0020 | 0x0010
    reply = refusal(query(flags=flags))
    assert reply is not None
    assert HEADER.unpack_from(reply)[1] == 0x8000 | (2 << 11) | 5
    assert HEADER.unpack_from(refusal(query(flags=0x0100 | 0x0004)))[1] == 0x8105  # an rcode in a query is ignored


def test_the_answer_is_never_larger_than_the_query():
    long = ".".join(["a" * 63] * 3 + ["b" * 61])  # 255 octets on the wire: the longest name there is
    for message in (query(long, 255), query(long, 16, additional=COOKIE_OPT)):
        reply = refusal(message)
        assert reply is not None and len(reply) <= len(message) and len(reply) <= 512


@pytest.mark.parametrize(
    "message",
    [
        b"",
        query()[:11],
        query()[:12],  # a header and no question
        query(flags=0x8100),  # a response (QR set): reflected at us, never answered
        query(qdcount=0)[:12],
        query(qdcount=0),
        query(qdcount=2),
        query(qdcount=2) + question("second.example"),
        HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!HH", 1, 1),  # pointer in the question
        HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\x03www\xc0\x0c" + struct.pack("!HH", 1, 1),
        HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\x00" + struct.pack("!HH", 1, 1),  # label 64
        HEADER.pack(1, 0x0100, 1, 0, 0, 0) + b"\x80\x00" + struct.pack("!HH", 1, 1),  # reserved label type
        query(".".join(["a" * 63] * 3 + ["b" * 62])),  # 256 octets
        query(".".join(["a" * 63] * 5)),
        query() + b"junk",  # trailing bytes beyond every record
        query(additional=OPT) + b"\x00",
        query(arcount=1),  # an additional record announced and missing
        query(additional=OPT[:-1]),  # a truncated OPT
        query(additional=b"\x00" + struct.pack("!HHIH", 41, 512, 0, 100) + b"x"),  # RDLENGTH past the end
        query()[:-1],  # QCLASS cut short
        query()[:14],  # the name cut short
    ],
)
def test_a_message_that_is_not_one_well_formed_query_gets_no_answer(message):
    assert refusal(message) is None


def test_the_longest_name_is_still_a_query():
    assert refusal(query(".".join(["a" * 63] * 3 + ["b" * 61]))) is not None
    assert refusal(query("")) is not None  # the root


def test_the_logged_name_is_lowercase_printable_and_capped():
    assert display_name([b"API", b"Example", b"COM"]) == "api.example.com"
    assert display_name([]) == "."
    assert display_name([b"a.b", b"c\\d", b"e f", b"\x00\xff\n"]) == "a\\046b.c\\092d.e\\032f.\\000\\255\\010"
    assert display_name([b"\xc3\x89T\xc3\xa9"]) == "\\195\\137t\\195\\169"  # bytes above ASCII are not lowercased
    long = display_name([b"\x01" * 63] * 4)
    assert len(long) == 253 and long.isprintable() and long.isascii()


# -- refusal() over any input -------------------------------------------------------------------------------

near_queries = st.builds(
    lambda ident, flags, counts, body: HEADER.pack(ident, flags, *counts) + body,
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.tuples(*[st.sampled_from([0, 1, 2, 0xFFFF])] * 4),
    st.one_of(
        st.binary(max_size=600),
        st.lists(st.binary(min_size=0, max_size=70), max_size=6).map(
            lambda labels: b"".join(bytes([len(x)]) + x for x in labels) + b"\x00\x00\x01\x00\x01"
        ),
        st.tuples(st.binary(max_size=30), st.binary(max_size=30)).map(
            lambda p: qname(p[0]) + b"\x00\x10\x00\x01" + p[1]
        ),
    ),
)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=700), near_queries))
def test_refusal_never_raises_and_never_says_more_than_refused(message):
    reply = refusal(message)
    if reply is None:
        return
    assert 12 <= len(reply) <= 512 and len(reply) <= len(message)
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(reply)
    assert ident == HEADER.unpack_from(message)[0]
    assert flags & 0x8000 and flags & 0xF == 5 and not flags & 0x0080  # QR, REFUSED, no RA
    assert (qdcount, ancount, nscount, arcount) == (1, 0, 0, 0)
    assert message[12 : len(reply)] == reply[12:]  # the question, as it came


# -- the servers, on loopback ----------------------------------------------------------------------------------


@pytest.fixture
def refuser():
    """The UDP and TCP refuser on 127.0.0.1 (a free port) in a thread; yields (port, audit list)."""
    audit: list[dict] = []
    loop = asyncio.new_event_loop()
    started: list = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        started.append(loop.run_until_complete(listen("127.0.0.1", 0, audit.append, max_tcp=2, idle=0.5)))
        ready.set()
        loop.run_forever()
        pending = asyncio.all_tasks(loop)  # connections still being served
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    yield started[0].port, audit
    loop.call_soon_threadsafe(started[0].close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def udp_exchange(port: int, message: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(message, ("127.0.0.1", port))
        try:
            return sock.recv(4096)
        except TimeoutError:
            return None


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def tcp_message(sock: socket.socket) -> bytes:
    (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    return recv_exactly(sock, length)


def closed(sock: socket.socket) -> bool:
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_for(audit: list, count: int) -> list:
    deadline = time.monotonic() + 3
    while len(audit) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return audit


def test_a_udp_query_is_refused_and_logged_once(refuser):
    port, audit = refuser
    reply = udp_exchange(port, query("Secret-Data.Exfil.Example", 16, ident=7, additional=OPT))
    assert reply == HEADER.pack(7, 0x8105, 1, 0, 0, 0) + question("Secret-Data.Exfil.Example", 16)
    [entry] = audit
    assert {k: v for k, v in entry.items() if k != "time"} == {
        "event": "dns", "decision": "refused", "name": "secret-data.exfil.example", "qtype": 16, "client": "127.0.0.1"
    }  # fmt: skip
    assert time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ")


def test_a_garbage_datagram_gets_no_answer_and_one_dropped_line(refuser):
    port, audit = refuser
    assert udp_exchange(port, b"\x12\x34" + b"secret payload", timeout=0.5) is None
    [entry] = wait_for(audit, 1)
    assert (entry["event"], entry["decision"], entry["client"]) == ("dns", "dropped", "127.0.0.1")
    assert entry["reason"] and "secret" not in str(entry) and "name" not in entry


def test_two_queries_on_one_tcp_connection_get_two_answers(refuser):
    port, audit = refuser
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        first, second = query("one.example", 1, ident=1), query("two.example", 28, ident=2, additional=OPT)
        sock.sendall(struct.pack("!H", len(first)) + first + struct.pack("!H", len(second)))
        sock.sendall(second)
        assert tcp_message(sock) == HEADER.pack(1, 0x8105, 1, 0, 0, 0) + question("one.example", 1)
        assert tcp_message(sock) == HEADER.pack(2, 0x8105, 1, 0, 0, 0) + question("two.example", 28)
    assert [(e["decision"], e["name"], e["qtype"]) for e in audit] == [("refused", "one.example", 1),
                                                                      ("refused", "two.example", 28)]  # fmt: skip


@pytest.mark.parametrize(
    ("sent", "reason"),
    [(struct.pack("!H", 0), "TCP length 0"), (struct.pack("!H", 11) + b"x" * 11, "TCP length 11"),
     (struct.pack("!H", 30) + b"\x00" * 30, "0 questions, not 1"),
     (struct.pack("!H", 100) + b"x" * 20, "truncated TCP message")],
)  # fmt: skip
def test_a_bad_tcp_message_closes_the_connection_with_one_dropped_line(refuser, sent, reason):
    port, audit = refuser
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(sent)
        assert closed(sock)
    [entry] = wait_for(audit, 1)
    assert entry["decision"] == "dropped" and reason in entry["reason"]


def test_an_idle_tcp_connection_is_closed_without_a_line(refuser):
    port, audit = refuser
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        started = time.monotonic()
        assert closed(sock)
        assert 0.3 < time.monotonic() - started < 2.5  # the fixture's idle timeout is 0.5 s
    assert audit == []


def test_tcp_connections_beyond_the_cap_are_closed_at_once(refuser):
    port, audit = refuser
    held = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(2)]
    try:
        time.sleep(0.1)  # both are being served
        with socket.create_connection(("127.0.0.1", port), timeout=3) as extra:
            assert closed(extra)
        assert [e["reason"] for e in wait_for(audit, 1)] == ["too many TCP connections"]
        message = query(ident=9)
        held[0].sendall(struct.pack("!H", len(message)) + message)
        assert HEADER.unpack_from(tcp_message(held[0]))[0] == 9  # the ones within the cap still work
    finally:
        for sock in held:
            sock.close()


def test_udp_and_tcp_share_the_port_and_a_taken_port_fails_to_bind():
    async def attempt() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            with pytest.raises(OSError):
                await listen("127.0.0.1", taken.getsockname()[1], lambda entry: None)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError):
                await listen("127.0.0.1", port, lambda entry: None)
            # the UDP half was let go again when TCP failed
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
                again.bind(("127.0.0.1", port))

    asyncio.run(attempt())


# -- the bundle's entry point ----------------------------------------------------------------------------------


def _free_port() -> int:
    """A port free for UDP and TCP on every address (the bundle binds 0.0.0.0)."""
    return free_port("0.0.0.0", udp=True)


def _config(**ports) -> str:
    from tests.unit.test_bundle_start import CONFIG

    return CONFIG.model_copy(update=ports).model_dump_json()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_a_dns_port_in_use_stops_the_bundle_with_one_line(tmp_path, kind):
    from tests.unit.test_bundle_start import start

    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        code, err = start(tmp_path, config=_config(port=_free_port(), dns_port=port))
    what = "UDP" if kind == socket.SOCK_DGRAM else "TCP"
    assert code == 2 and f"cannot listen on :{port} (DNS, {what})" in err and err.count("\n") == 1


@pytest.mark.parametrize("dns_port", [0, 65536, -1, "53", 8888])
def test_a_bad_dns_port_stops_the_bundle(tmp_path, dns_port):
    from tests.unit.test_bundle_start import start

    config = json.loads(_config()) | {"dns_port": dns_port}
    code, err = start(tmp_path, config=json.dumps(config))
    assert code == 2 and "dns_port" in err and err.count("\n") == 1


def test_the_running_bundle_refuses_dns_and_logs_it_on_stdout(tmp_path):
    from bottle.bundle.ca import create_ca

    port, dns_port = _free_port(), _free_port()
    while dns_port == port:
        dns_port = _free_port()
    (tmp_path / "config.json").write_text(_config(port=port, dns_port=dns_port))
    (tmp_path / "secrets.json").write_text('{"credential-0": "sk-x"}')
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "mitmproxy-ca.pem").write_bytes(b"".join(create_ca("test")))
    bundle = subprocess.Popen(
        [sys.executable, "-c", "import sys; from bottle.bundle.__main__ import main; sys.exit(main())"],
        env={"BOTTLE_BUNDLE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        reply = None
        while reply is None and time.monotonic() < deadline and bundle.poll() is None:
            reply = udp_exchange(dns_port, query("Leak.Example", 16, ident=3), timeout=0.3)
        assert reply == HEADER.pack(3, 0x8105, 1, 0, 0, 0) + question("Leak.Example", 16)
    finally:
        bundle.terminate()
        out, err = bundle.communicate(timeout=10)
    entries = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["decision"], e["name"], e["qtype"]) for e in entries] == [("dns", "refused",
                                                                                      "leak.example", 16)]  # fmt: skip
    assert f"refusing DNS on :{dns_port}" in err


def test_only_the_agents_network_is_answered_when_the_bundle_names_its_clients():
    from ipaddress import ip_network

    from bottle.bundle.dns import handle

    audit: list[dict] = []
    agents = [ip_network("10.9.0.0/24")]
    message = query("example.invalid", 1, ident=9)
    assert handle(message, "10.9.0.3", audit.append, agents) is not None
    assert handle(message, "10.9.1.1", audit.append, agents) is None  # the host, on the egress network
    assert handle(message, "not-an-address", audit.append, agents) is None
    assert [(e["decision"], e["client"]) for e in audit] == [
        ("refused", "10.9.0.3"), ("dropped", "10.9.1.1"), ("dropped", "not-an-address")
    ]
    assert audit[1]["reason"] == "not the agent's address" and "name" not in audit[1]
