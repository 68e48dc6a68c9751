"""The bundle's DNS: every query is refused and logged; nothing is ever resolved.

smolvm gives the guest a resolver path of its own, outside the IP allowlist, and bottle points it at
the bundle. A name is a channel out (data can be encoded in the labels of a query), so the bundle
answers every well-formed query with REFUSED and resolves nothing; the agent needs no DNS, since it
reaches the world only through the proxy, which resolves names itself. Each query, and each message
that is not one, gets exactly one line in the audit log the proxy writes to.

An answer is the query's header and question and nothing else, never larger than the query, so the
refuser cannot amplify a reflected flood; a message that is not a query gets no answer at all.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, cast

from bottle.bundle.addon import AuditSink
from bottle.bundle.policy import IPNetwork

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
QR, OPCODE, RD = 0x8000, 0x7800, 0x0100
REFUSED = 5
IDLE_TIMEOUT = 10.0  # seconds a TCP connection may wait for its next message before it is closed
MAX_TCP_CONNECTIONS = 64
NAME_CAP = 253  # characters of a name the audit log keeps


class Malformed(ValueError):
    """A message that is not one well-formed DNS query; its text is a short reason, never its bytes."""


@dataclass(frozen=True)
class Query:
    ident: int
    flags: int
    question: bytes  # QNAME, QTYPE and QCLASS as they came, echoed in the answer
    name: str  # for the audit log: lowercased, printable, escaped, capped
    qtype: int


def _question_name(message: bytes, offset: int) -> tuple[list[bytes], int]:
    """The labels of the name at `offset`, and where it ends; no compression (a question has nothing to
    point back to), labels of at most 63 octets, at most 255 octets in all."""
    labels: list[bytes] = []
    size = 0
    while True:
        if offset >= len(message):
            raise Malformed("truncated question")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            raise Malformed("compression pointer in the question")
        if length > 63:
            raise Malformed("label longer than 63 octets")
        size += 1 + length
        if size > 255:
            raise Malformed("name longer than 255 octets")
        if length == 0:
            return labels, offset + 1
        if offset + 1 + length > len(message):
            raise Malformed("truncated question")
        labels.append(message[offset + 1 : offset + 1 + length])
        offset += 1 + length


def _skip_record(message: bytes, offset: int) -> int:
    """Where the resource record at `offset` ends (an EDNS OPT record, say); its content is never read."""
    while True:
        if offset >= len(message):
            raise Malformed("truncated record")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            offset += 2
            break
        if length > 63:
            raise Malformed("bad label in a record")
        offset += 1 + length
        if length == 0:
            break
    if offset + 10 > len(message):
        raise Malformed("truncated record")
    (rdlength,) = struct.unpack_from("!H", message, offset + 8)
    offset += 10 + rdlength
    if offset > len(message):
        raise Malformed("truncated record")
    return offset


def display_name(labels: list[bytes]) -> str:
    """A name as the log shows it: lowercase, printable ASCII, anything else (and '.' or '\\' inside a
    label) as \\DDD, at most NAME_CAP characters."""
    if not labels:
        return "."

    def char(b: int) -> str:
        return chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"

    return ".".join("".join(map(char, label.lower())) for label in labels)[:NAME_CAP]


def parse(message: bytes) -> Query:
    """The one question of a DNS query; Malformed if `message` is anything else, trailing bytes included."""
    if len(message) < HEADER.size:
        raise Malformed("shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(message)
    if flags & QR:
        raise Malformed("a response, not a query")
    if qdcount != 1:
        raise Malformed(f"{qdcount} questions, not 1")
    labels, end = _question_name(message, HEADER.size)
    if end + 4 > len(message):
        raise Malformed("truncated question")
    (qtype,) = struct.unpack_from("!H", message, end)
    offset = end + 4
    for _ in range(ancount + nscount + arcount):
        offset = _skip_record(message, offset)
    if offset != len(message):
        raise Malformed("bytes after the last record")
    return Query(ident, flags, message[HEADER.size : end + 4], display_name(labels), qtype)


def answer(query: Query) -> bytes:
    """REFUSED, with the query's ID, opcode and RD bit and its question; no records, no EDNS."""
    flags = QR | (query.flags & (OPCODE | RD)) | REFUSED
    return HEADER.pack(query.ident, flags, 1, 0, 0, 0) + query.question


def refusal(message: bytes) -> bytes | None:
    """The answer to `message`: REFUSED for a well-formed query, None (no answer) for anything else."""
    try:
        return answer(parse(message))
    except Malformed:
        return None


def _entry(client: str, decision: str, **fields: Any) -> dict[str, Any]:
    """An audit line in the proxy's shape (its `time`), marked as DNS."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": "dns", "decision": decision,
            **fields, "client": client}  # fmt: skip


def is_client(client: str, clients: Sequence[IPNetwork]) -> bool:
    """Whether `client` may be answered: anyone when `clients` is empty, else an address inside one."""
    try:
        return not clients or any(ip_address(client) in network for network in clients)
    except ValueError:
        return False


def handle(message: bytes, client: str, audit: AuditSink, clients: Sequence[IPNetwork] = ()) -> bytes | None:
    """Refuse one message from `client` and write its one audit line; the answer, or None to send none.

    A client outside `clients` (when given: the agent's network) is not answered at all.
    """
    if not is_client(client, clients):
        audit(_entry(client, "dropped", reason="not the agent's address"))
        return None
    try:
        query = parse(message)
    except Malformed as exc:
        audit(_entry(client, "dropped", reason=str(exc)))
        return None
    audit(_entry(client, "refused", name=query.name, qtype=query.qtype))
    return answer(query)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, audit: AuditSink, clients: Sequence[IPNetwork]):
        self.audit, self.clients = audit, clients
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = handle(data, str(addr[0]), self.audit, self.clients)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier answer; there is nothing to retry


class _Tcp:
    """DNS over TCP (RFC 1035 4.2.2): a 2-octet length, then the message; several per connection."""

    def __init__(self, audit: AuditSink, limit: int, idle: float, clients: Sequence[IPNetwork]):
        self.audit, self.limit, self.idle, self.clients = audit, limit, idle, clients
        self.open = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        if self.open >= self.limit:
            self.audit(_entry(client, "dropped", reason="too many TCP connections"))
            writer.close()
            return
        self.open += 1
        try:
            await self._serve(reader, writer, client)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or stalled: close, as below
        finally:
            self.open -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> None:
        while True:
            try:
                prefix = await asyncio.wait_for(reader.readexactly(2), self.idle)
            except (TimeoutError, asyncio.IncompleteReadError):
                return  # idle, or closed between messages: nothing to log
            (length,) = struct.unpack("!H", prefix)
            if length < HEADER.size:
                self.audit(_entry(client, "dropped", reason=f"TCP length {length} is shorter than a DNS header"))
                return
            try:
                message = await asyncio.wait_for(reader.readexactly(length), self.idle)
            except (TimeoutError, asyncio.IncompleteReadError):
                self.audit(_entry(client, "dropped", reason="truncated TCP message"))
                return
            reply = handle(message, client, self.audit, self.clients)
            if reply is None:
                return  # not a query: the stream cannot be trusted to be framed any more
            writer.write(struct.pack("!H", len(reply)) + reply)
            await asyncio.wait_for(writer.drain(), self.idle)


@dataclass
class Refuser:
    """The running DNS refuser: a UDP endpoint and a TCP server on one port."""

    udp: asyncio.DatagramTransport
    tcp: asyncio.Server
    port: int

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


async def listen(host: str, port: int, audit: AuditSink, *, max_tcp: int = MAX_TCP_CONNECTIONS,
                 idle: float = IDLE_TIMEOUT, clients: Sequence[IPNetwork] = ()) -> Refuser:  # fmt: skip
    """Refuse DNS on `host`:`port`, UDP and TCP; port 0 picks a free UDP port and takes TCP on the same.

    Both sockets are bound before either serves; if one cannot be, OSError, and neither is left open.
    """
    udp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp_sock.bind((host, port))
        port = udp_sock.getsockname()[1]
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's own servers do
        tcp_sock.bind((host, port))
        tcp_sock.listen(MAX_TCP_CONNECTIONS)
    except OSError:
        udp_sock.close()
        tcp_sock.close()
        raise
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(audit, clients), sock=udp_sock)
    tcp = await asyncio.start_server(_Tcp(audit, max_tcp, idle, clients), sock=tcp_sock)
    return Refuser(udp, tcp, port)
