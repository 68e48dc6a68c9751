"""The proxy's front door: every connection to the bundle's proxy port arrives here first.

A CONNECT from the agent that the policy allows is answered (and logged) here, and the agent's first bytes
in the tunnel are read: when they are a TLS ClientHello naming the CONNECT's host,
- a passthrough tunnel (`intercept = false`) is relayed as bytes by the event loop's own transports, to
  exactly the address the policy checked: nothing of mitmproxy's HTTP, TLS or hook machinery runs for it;
- an intercepted one has the bundle's TLS completed here, by the ssl module (AgentTLS), and what the agent
  sends inside goes to mitmproxy on the layers its own interception would have put above that TLS:
  upstream TLS opened and verified for the host, then HTTP, where the whole policy meets every request.
Any other tunnel's content (not TLS, or for another server name, or none) goes to mitmproxy as it is, on
its transparent-mode layers (those a CONNECT tunnel gets inside it), with its destination already known;
there the policy intercepts it and answers its requests with a 403 where the names disagree.

Everything else reaches mitmproxy from its first byte, exactly as the agent sent it: a plain request,
a refused CONNECT, a client that is not the agent, anything that does not parse the simple way. The
decision is the same in every case (BottlePolicy.decide, its checked address and its cache), and so
is the audit log. Together this took most of mitmproxy's per-connection cost off a passthrough tunnel
and about a quarter off an intercepted one (benchmarks/proxy.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import tempfile
import time
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import CommandGenerator
from mitmproxy.proxy.layers.http import HTTPMode, Http1Server, ReceiveHttp, RequestProtocolError, is_h3_alpn
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler, ServerInstance
from mitmproxy.tls import ClientHello

from bottle.bundle.addon import DNS_PORTS, BottlePolicy, _authority, _name

HEAD_LIMIT = 65536  # bytes a request head may take (Node's own limit is 16 KiB)
HELLO_LIMIT = 65536  # bytes a ClientHello may take before the connection goes to mitmproxy instead
CONTEXT_CACHE = 256  # hosts whose TLS context is kept (a bottle talks to a handful)
IDLE_TIMEOUT = 600.0  # seconds a tunnel may carry nothing either way before it is closed (mitmproxy's own)
_CHUNK = 65536
_HEADER = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*")  # a header line as the fast path takes it
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# The bytes a host and port may be made of here. mitmproxy's own check lets a LF through at the end of a
# label (its patterns end in `$`, which matches before one); such a head goes to mitmproxy, which refuses it.
_AUTHORITY = re.compile(rb"[A-Za-z0-9.:_\[\]-]+")


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def connect_target(head: bytes) -> tuple[str, int, bytes] | None:
    """(host, port, HTTP version) of a CONNECT request head (without its blank line), or None if it is
    anything else, or anything less plain than a CONNECT needs to be."""
    request_line, *headers = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in _VERSIONS or not _AUTHORITY.fullmatch(parts[1]):
        return None
    if not all(_HEADER.fullmatch(line) for line in headers):
        return None
    if any(line.split(b":", 1)[0].lower() in (b"content-length", b"transfer-encoding") for line in headers):
        return None  # a CONNECT with a body is mitmproxy's to judge
    named = _authority(parts[1].decode("ascii"))
    if named is None or named[1] is None:
        return None
    return named[0], named[1], parts[2]


async def _read(reader: asyncio.StreamReader) -> bytes:
    """The next bytes from the agent; none if it closes, or sends nothing for IDLE_TIMEOUT seconds."""
    try:
        return await asyncio.wait_for(reader.read(_CHUNK), IDLE_TIMEOUT)
    except asyncio.TimeoutError:
        return b""


async def _client_hello(reader: asyncio.StreamReader, read: bytes) -> tuple[bytes | None, ClientHello | None]:
    """The agent's first bytes in a tunnel, read until they hold a whole TLS ClientHello, and that ClientHello
    (None if they are not TLS); (None, None) if the agent leaves first."""
    while True:
        try:
            hello = parse_client_hello(read)
        except ValueError:
            return read, None
        if hello is not None or len(read) > HELLO_LIMIT:
            return read, hello
        more = await _read(reader)
        if not more:
            return None, None
        read += more


class AgentTLS:
    """The agent's side of an intercepted tunnel, with the bundle's TLS on it: plaintext in and out, as the
    reader and writer mitmproxy's connection handler takes.

    The TLS is the ssl module's (OpenSSL, called from C) over memory buffers, so the ClientHello the front
    door has read already is where the handshake starts. mitmproxy's own TLS layer drives pyOpenSSL from
    Python with a hook at each step; it was the largest single cost of an intercepted request.
    """

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 received: bytes):  # fmt: skip
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._incoming.write(received)
        self.tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._reader, self._writer = reader, writer

    def _send(self) -> None:
        data = self._outgoing.read()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _receive(self, handshake: bool = False) -> None:
        # Only the handshake is timed here. Once it is done the tunnel is idle when mitmproxy says so, which counts
        # the upstream's traffic too: an agent waits on a long answer without a byte of its own.
        data = await (_read(self._reader) if handshake else self._reader.read(_CHUNK))
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self) -> None:
        """Complete the handshake; ssl.SSLError (an OSError) if it fails or the agent leaves during it."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._answer_then_receive(handshake=True)
        self._send()

    async def _answer_then_receive(self, handshake: bool = False) -> None:
        # What the TLS answers on its own (a key update, an alert refusing a renegotiation) is sent and waited
        # out before more is read: an agent that never reads stalls itself, not the bundle's memory.
        self._send()
        await self._writer.drain()
        await self._receive(handshake)

    async def read(self, n: int = -1) -> bytes:
        """Plaintext from the agent, as much as the records received so far hold (up to n); none once it closes."""
        n = n if n > 0 else _CHUNK
        while True:
            try:
                data = [self.tls.read(n)]
                break
            except ssl.SSLWantReadError:
                await self._answer_then_receive()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
        size = len(data[0])
        while size < n and self._incoming.pending:  # more records here already: one event for mitmproxy, not one each
            try:
                more = self.tls.read(n - size)
            except ssl.SSLError:
                break  # a record not yet whole, the end, or an error: the next read meets it
            if not more:
                break
            data.append(more)
            size += len(more)
        self._send()
        return b"".join(data)

    def write(self, data: bytes) -> None:
        try:
            self.tls.write(data)
        except ssl.SSLError:  # the TLS broke (a bad record from the agent, say): nothing more reaches it
            self._writer.close()
        else:
            self._send()

    def write_eof(self) -> None:
        """TLS's half-close (close_notify), then TCP's."""
        self._shutdown()
        self._writer.write_eof()

    def close(self) -> None:
        self._shutdown()
        self._writer.close()

    def _shutdown(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # sent; the agent's own close_notify is not waited for
        self._send()

    def can_write_eof(self) -> bool:
        return self._writer.can_write_eof()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    async def drain(self) -> None:
        await self._writer.drain()

    async def wait_closed(self) -> None:
        await self._writer.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._writer.get_extra_info(name, default)


class ClosingClientTLSLayer(layers.ClientTLSLayer):
    """mitmproxy's TLS with the agent (tunnels the front door does not complete itself), closed at the first
    record it cannot read after the handshake. mitmproxy logs such an error and reads on, into a buffer the
    broken TLS never empties: an agent could fill the bundle's memory, and its log, as fast as it can send."""

    def receive_data(self, data: bytes) -> CommandGenerator[None]:
        yield from super().receive_data(data)
        if self.tls.get_state_string() == b"error":  # OpenSSL's state once a fatal alert went out
            yield commands.CloseConnection(self.conn)


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side, holding at most HEAD_LIMIT bytes it cannot parse yet. mitmproxy holds
    what the agent sends until it parses: a head until its blank line, a chunk-size or trailer line until its
    end, anything sent while an answer is awaited, however long; an agent could fill the bundle's memory with
    any of them. A head that goes over is refused with a 431 and an audit line (from `refused`); anything else
    closes the connection, and the request in flight gets its error line."""

    def __init__(self, context: Context, refused: Callable[[str], None]):
        super().__init__(context)
        self._refused = refused

    def _handle_event(self, event: Any) -> CommandGenerator[None]:
        yield from super()._handle_event(event)
        if len(self.buf) <= HEAD_LIMIT or self.state == self.done:
            return
        if self.state == self.read_headers:  # still no whole head
            self._refused(self.conn.id)
            answer = http.Response.make(431, f"bottle: refused: a request head over {HEAD_LIMIT} bytes\n",
                                        {"content-type": "text/plain; charset=utf-8", "connection": "close"})
            yield commands.SendData(self.conn, http1.assemble_response(answer))
            yield commands.CloseConnection(self.conn)
        else:  # as mitmproxy ends a request whose body does not parse: its flow fails, and is logged so
            yield commands.CloseConnection(self.conn)
            if self.stream_id is not None:
                reason = f"the agent sent over {HEAD_LIMIT} bytes that could not be parsed yet"
                yield ReceiveHttp(RequestProtocolError(self.stream_id, reason))
        self.state = self.done


class BoundedHttpLayer(layers.HttpLayer):
    """mitmproxy's HttpLayer, with a BoundedHttp1Server for the agent wherever it makes an Http1Server (it
    takes one that is there when it starts, when the agent's ALPN is known). HTTP/2's library bounds what it
    holds of a header block itself (a few MiB a connection, however many CONTINUATION frames)."""

    refused: Callable[[str], None]

    def _handle_event(self, event: Any) -> CommandGenerator[None]:
        if isinstance(event, events.Start):
            alpn = self.context.client.alpn
            if alpn != b"h2" and not is_h3_alpn(alpn):
                self.connections[self.context.client] = BoundedHttp1Server(self.context.fork(), self.refused)
        yield from super()._handle_event(event)


class Bounds:
    """A mitmproxy addon, after its NextLayer, for the bounds its layers lack against a hostile agent: the
    agent's TLS layers it picks close at their first unreadable record (ClosingClientTLSLayer), and its HTTP
    layers hold at most HEAD_LIMIT bytes they cannot parse yet (BoundedHttpLayer)."""

    def __init__(self, addon: BottlePolicy):
        self.refused = functools.partial(addon.log_head_too_large, limit=HEAD_LIMIT)

    def next_layer(self, nextlayer: Any) -> None:
        layer = nextlayer.layer  # a layer, or a short stack: TLS both ways, or TLS with HTTP (an HTTPS proxy)
        while layer is not None:
            if type(layer) is layers.ClientTLSLayer:
                layer.__class__ = ClosingClientTLSLayer  # the same layer, already in its context's stack
            elif type(layer) is layers.HttpLayer:
                self.bound(layer)
                return
            layer = getattr(layer, "child_layer", None)

    def bound(self, layer: layers.HttpLayer) -> None:
        layer.__class__ = BoundedHttpLayer
        layer.refused = self.refused


class _Replay:
    """A reader that gives back what the front door read first, then reads on."""

    def __init__(self, read: bytes, reader: asyncio.StreamReader):
        self._read, self._reader = read, reader

    async def read(self, n: int = -1) -> bytes:
        if self._read:
            data, self._read = self._read, b""
            return data
        return await self._reader.read(n)


class Mitmproxy:
    """mitmproxy's side of the front door: a connection from its first byte, or the content of a tunnel."""

    def __init__(self, instance: ServerInstance, bounds: Bounds):
        self.instance = instance  # the regular-mode server instance, never started: the front door listens
        self.bounds = bounds
        self._contexts: dict[str, ssl.SSLContext] = {}

    def tls_context(self, host: str) -> ssl.SSLContext:
        """The TLS server context the agent meets for host: mitmproxy's certificate for it (from the bottle's CA,
        as mitmproxy's own TLS layer would present), HTTP/2 or HTTP/1.1, TLS 1.2 at least, no renegotiation."""
        context = self._contexts.get(host)
        if context is None:
            if len(self._contexts) >= CONTEXT_CACHE:
                self._contexts.clear()
            entry = ctx.master.addons.get("tlsconfig").certstore.get_cert(host, [_general_name(host)])
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.options |= ssl.OP_NO_RENEGOTIATION
            context.set_alpn_protocols(["h2", "http/1.1"])
            key = entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())  # fmt: skip
            # The ssl module loads a certificate only from a file: one in mitmproxy's private confdir, for a moment.
            with tempfile.NamedTemporaryFile(dir=ctx.options.confdir, suffix=".pem") as pem:
                pem.write(entry.cert.to_pem() + key)
                pem.flush()
                context.load_cert_chain(pem.name)
            self._contexts[host] = context
        return context

    async def handle_decrypted(self, agent: AgentTLS, host: str, port: int, hello: ClientHello,
                               opened: Callable[[str], None]) -> None:  # fmt: skip
        """What the agent sends inside the bundle's TLS (`agent`, terminated by the front door) in a tunnel to
        host:port, on the layers mitmproxy's own TLS interception would give it: upstream TLS, then HTTP."""
        handler = ProxyConnectionHandler(ctx.master, agent, agent, ctx.options, self.instance.mode)
        context = handler.layer.context
        client = context.client
        client.tls, client.sni, client.alpn_offers = True, hello.sni, hello.alpn_protocols
        client.alpn = (agent.tls.selected_alpn_protocol() or "").encode() or None
        client.tls_version, client.cipher = agent.tls.version(), agent.tls.cipher()[0]
        client.timestamp_tls_setup = time.time()
        context.server.address, context.server.sni = (host, port), host
        handler.layer = layers.ServerTLSLayer(context)
        handler.layer.child_layer = layers.HttpLayer(context, HTTPMode.transparent)
        self.bounds.bound(handler.layer.child_layer)
        await self._serve(handler, opened)

    async def handle_stream(self, reader: Any, writer: asyncio.StreamWriter) -> None:
        await self.instance.handle_stream(reader, writer)

    async def handle_tunnel(self, reader: Any, writer: asyncio.StreamWriter, host: str, port: int,
                            opened: Callable[[str], None]) -> None:  # fmt: skip
        """What follows a CONNECT to host:port that the front door answered, on mitmproxy's transparent-mode
        layers (those a CONNECT tunnel gets inside it); `opened` is told the connection's id first."""
        handler = ProxyConnectionHandler(ctx.master, reader, writer, ctx.options, self.instance.mode)
        handler.layer = layers.modes.TransparentProxy(handler.layer.context)
        handler.layer.context.server.address = (host, port)
        await self._serve(handler, opened)

    async def _serve(self, handler: ProxyConnectionHandler, opened: Callable[[str], None]) -> None:
        client = handler.layer.context.client
        opened(client.id)
        with self.instance.manager.register_connection(client.id, handler):
            await handler.handle_client()


class Front:
    """Serves the proxy port: answers the agent's allowed CONNECTs, relays its passthrough tunnels, and gives
    `mitmproxy` the rest."""

    def __init__(self, addon: BottlePolicy, mitmproxy: Mitmproxy):
        self.addon = addon
        self.mitmproxy = mitmproxy

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peername = writer.get_extra_info("peername")
            if peername is None:  # reset before it was accepted: nothing to read, no one to answer
                return
            if not self.addon.admits(peername):  # refused (and logged) there, at once
                return await self.mitmproxy.handle_stream(_Replay(b"", reader), writer)
            read = await _read(reader)
            tunnel = self._tunnel(read)
            decision = await self.addon.decide(tunnel[0], tunnel[1]) if tunnel else None
            if tunnel is None or decision is None or not decision.allowed:  # refused there, by the same decision
                return await self.mitmproxy.handle_stream(_Replay(read, reader), writer)
            host, port, version, head = tunnel
            self.addon.log_tunnel(host, port, decision)  # granted, whether or not the agent is still there to hear it
            if writer.is_closing():
                return
            writer.write(version + b" 200 Connection established\r\n\r\n")
            received, hello = await _client_hello(reader, read[head:])
            if received is None:  # the agent left, or idled, without a ClientHello
                return
            opened = functools.partial(self.addon.open_tunnel, host=host, port=port, decision=decision)
            if hello is not None and hello.sni and _name(hello.sni) == host:
                if not decision.intercept:
                    return await self._relay(reader, writer, host, port, received)
                return await self._intercept(AgentTLS(self.mitmproxy.tls_context(host), reader, writer, received),
                                             host, port, hello, opened)  # fmt: skip
            # Not TLS, or TLS for another name (or none): mitmproxy intercepts it, and answers with 403s where
            # the names disagree.
            await self.mitmproxy.handle_tunnel(_Replay(received, reader), writer, host, port, opened)
        except OSError:
            pass  # the agent's connection broke; what was granted is logged already
        finally:
            writer.close()

    async def _intercept(self, agent: AgentTLS, host: str, port: int, hello: ClientHello,
                         opened: Callable[[str], None]) -> None:  # fmt: skip
        """Complete the agent's TLS with the bundle for host, then give mitmproxy what the agent sends inside."""
        try:
            await agent.handshake()
        except OSError as exc:
            self.addon.log_tls_failed(host, port, exc)
            return
        await self.mitmproxy.handle_decrypted(agent, host, port, hello, opened)

    def _tunnel(self, read: bytes) -> tuple[str, int, bytes, int] | None:
        """(host, port, version, length of the head) if `read` starts with a CONNECT to a host a rule names,
        on a port the rule allows: the connections the front door answers itself."""
        head, blank, _ = read.partition(b"\r\n\r\n")
        target = connect_target(head) if blank else None
        if target is None:
            return None
        host, port, version = target
        rule = self.addon.policy.rule_for(host)
        if rule is None or port not in rule.ports or port in DNS_PORTS:
            return None
        return host, port, version, len(head) + len(blank)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
                     hello: bytes) -> None:  # fmt: skip
        """Connect to the address the policy checks for host:port now, send it the ClientHello, and relay."""
        decision = await self.addon.decide(host, port)  # the same one as a moment ago, unless its time ran out
        if not decision.allowed:
            self.addon.log_tunnel(host, port, decision)
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(str(decision.address), port)
        except OSError as exc:
            self.addon.log_tunnel_error(host, port, exc, decision.rule)
            return
        loop = asyncio.get_running_loop()
        last = [loop.time()]

        def watch() -> None:
            idle = loop.time() - last[0]
            if idle >= IDLE_TIMEOUT:
                writer.close()
                upstream.close()
            else:
                timer[0] = loop.call_later(IDLE_TIMEOUT - idle, watch)

        timer = [loop.call_later(IDLE_TIMEOUT, watch)]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            # A closed transport is asked first: uvloop's raise RuntimeError when written to.
            try:
                while (data := await source.read(_CHUNK)) and not sink.is_closing():
                    sink.write(data)
                    last[0] = loop.time()
                    await sink.drain()
                if not sink.is_closing() and sink.can_write_eof():
                    sink.write_eof()
            except OSError:
                sink.close()

        try:
            upstream.write(hello)
            await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))
        finally:
            timer[0].cancel()
            upstream.close()
