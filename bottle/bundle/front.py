"""The proxy's front door: every connection to the bundle's proxy port arrives here first.

A CONNECT from the agent that the policy allows is answered (and logged) here. If its rule passes it
through (`intercept = false`) and its TLS ClientHello names the CONNECT's host, it is relayed as bytes
by the event loop's own transports, to exactly the address the policy checked: nothing of mitmproxy's
HTTP, TLS or hook machinery runs for it. Any other tunnel's content goes to mitmproxy as a connection
whose destination is already known (its transparent mode), so the HTTP layer of the CONNECT itself,
which every event of the tunnel used to pass through, is skipped; there the whole policy meets it
(interception, the destination checks, a 403 for a server name that does not match).

Everything else reaches mitmproxy from its first byte, exactly as the agent sent it: a plain request,
a refused CONNECT, a client that is not the agent, anything that does not parse the simple way. The
decision is the same in every case (BottlePolicy.decide, its checked address and its cache), and so
is the audit log. Together this took most of mitmproxy's per-connection cost off a passthrough tunnel
and about a tenth off an intercepted one (benchmarks/proxy.py).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy import layers
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.mode_servers import ProxyConnectionHandler, ServerInstance

from bottle.bundle.addon import DNS_PORTS, BottlePolicy, _authority, _name

HELLO_LIMIT = 65536  # bytes a ClientHello may take before the connection goes to mitmproxy instead
IDLE_TIMEOUT = 600.0  # seconds a tunnel may carry nothing either way before it is closed (mitmproxy's own)
_CHUNK = 65536
_HEADER = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*")  # a header line as the fast path takes it
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
# The bytes a host and port may be made of here. mitmproxy's own check lets a LF through at the end of a
# label (its patterns end in `$`, which matches before one); such a head goes to mitmproxy, which refuses it.
_AUTHORITY = re.compile(rb"[A-Za-z0-9.:_\[\]-]+")


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


async def _client_hello(reader: asyncio.StreamReader, read: bytes) -> tuple[bytes | None, str | None]:
    """The agent's first bytes in a tunnel, read until they hold a whole TLS ClientHello, and the server name
    it asks for (None if they are not TLS or name no server); (None, None) if the agent leaves first."""
    while True:
        try:
            hello = parse_client_hello(read)
        except ValueError:
            return read, None
        if hello is not None or len(read) > HELLO_LIMIT:
            return read, _name(hello.sni) if hello is not None and hello.sni else None
        more = await _read(reader)
        if not more:
            return None, None
        read += more


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

    def __init__(self, instance: ServerInstance):
        self.instance = instance  # the regular-mode server instance, never started: the front door listens

    async def handle_stream(self, reader: Any, writer: asyncio.StreamWriter) -> None:
        await self.instance.handle_stream(reader, writer)

    async def handle_tunnel(self, reader: Any, writer: asyncio.StreamWriter, host: str, port: int,
                            opened: Callable[[str], None]) -> None:  # fmt: skip
        """What follows a CONNECT to host:port that the front door answered, on mitmproxy's transparent-mode
        layers (those a CONNECT tunnel gets inside it); `opened` is told the connection's id first."""
        handler = ProxyConnectionHandler(ctx.master, reader, writer, ctx.options, self.instance.mode)
        handler.layer = layers.modes.TransparentProxy(handler.layer.context)
        client = handler.layer.context.client
        handler.layer.context.server.address = (host, port)
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
            inside = read[head:]
            if not decision.intercept:
                hello, sni = await _client_hello(reader, inside)
                if hello is None:  # the agent left, or idled, without a ClientHello
                    return
                if sni == host:
                    return await self._relay(reader, writer, host, port, hello)
                inside = hello  # not TLS, or TLS for another name: mitmproxy intercepts it and answers with 403s
            opened = functools.partial(self.addon.open_tunnel, host=host, port=port, decision=decision)
            await self.mitmproxy.handle_tunnel(_Replay(inside, reader), writer, host, port, opened)
        except OSError:
            pass  # the agent's connection broke; what was granted is logged already
        finally:
            writer.close()

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
