"""bottle's policy as a mitmproxy addon: allow or refuse, inject credentials, write the audit log.

Every check happens before any packet leaves for the destination (the proxy runs with
`connection_strategy=lazy`). One place, `destination`, decides where a request goes: every name the
request carries (the CONNECT authority, the TLS server name, `Host`/`:authority`, the request target's
own authority) must name the same host and port, or the request is refused. The host is then checked
by name and by resolved address, and `server_connect` connects to exactly the address that was checked,
so a name that re-resolves elsewhere (DNS rebinding) cannot slip through. Names resolve on a thread
pool with a timeout, never on the proxy's event loop, so one slow name stalls no other request.

A credential is added only to requests inside a CONNECT tunnel to its host whose TLS the bundle
terminates and whose upstream TLS the bundle opens with that host as server name and verifies against
it: never in cleartext, never towards a name the agent picked.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address
from typing import IO, Any

from mitmproxy import connection, http, tls
from mitmproxy.net.http import url
from mitmproxy.proxy import server_hooks

from bottle.bundle.policy import Decision, IPAddress, Policy, redact_path

AuditSink = Callable[[dict[str, Any]], None]
DNS_TIMEOUT = 5.0  # seconds one name may take to resolve before its request is refused
DECISION_TTL = 2.0  # seconds a decision (with its checked address) is reused for the same host and port
DNS_PORTS = frozenset({53, 5353})
_QUOTED = re.compile(r"""b'.*|b".*|[0-9a-fA-F]{16,}.*""", re.S)  # bytes mitmproxy quotes in its errors


def stream_sink(stream: IO[str]) -> AuditSink:
    """One JSON line per entry on `stream` (the bundle's stdout: `bottle logs` reads it with `docker logs`)."""

    def write(entry: dict[str, Any]) -> None:
        stream.write(json.dumps(entry, separators=(",", ":")) + "\n")
        stream.flush()

    return write


def stdout_sink(entry: dict[str, Any]) -> None:
    stream_sink(sys.stdout)(entry)


def _name(host: str) -> str:
    return host.lower().rstrip(".")


def _peer(peername: Any) -> IPAddress | None:
    """The address of a connection's peer (an IPv4-mapped IPv6 one as IPv4), if it has one."""
    if not peername:
        return None
    peer = ip_address(peername[0].split("%")[0])
    return getattr(peer, "ipv4_mapped", None) or peer


def _authority(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header or authority, or None if it does not parse as one."""
    try:
        host, port = url.parse_authority(value, check=True)
    except ValueError:
        return None
    return _name(host), port


class BottlePolicy:
    """The mitmproxy addon. `secrets` maps secret names to values; they are only ever put in headers."""

    def __init__(self, policy: Policy, secrets: dict[str, str], audit: AuditSink = stdout_sink,
                 *, dns_timeout: float = DNS_TIMEOUT):  # fmt: skip
        self.policy = policy
        self.secrets = secrets
        self.audit = audit
        self.dns_timeout = dns_timeout
        self._resolving = ThreadPoolExecutor(max_workers=32, thread_name_prefix="bottle-dns")
        self._decisions: dict[tuple[str, int], tuple[float, Decision]] = {}
        self._pending: dict[str, asyncio.Future[list[IPAddress] | Exception]] = {}
        self._mismatched: set[str] = set()  # passthrough connections whose server name was not their host
        self._tunnels: dict[str, tuple[str, int]] = {}  # client connection id -> its CONNECT host and port
        self._passthrough: set[str] = set()  # client connections tunnelled without interception
        self._relayed: set[str] = set()  # passthrough connections mitmproxy relays as they are: no flow reports them

    # -- deciding

    async def decide(self, host: str, port: int) -> Decision:
        """The policy's decision for host:port, resolved off the event loop, reused for DECISION_TTL seconds.

        Reusing a decision is safe: its address is the one that was checked, and it is where we connect.
        """
        key = (_name(host), port)
        cached = self._decisions.get(key)
        if cached is not None and time.monotonic() - cached[0] < DECISION_TTL:
            return cached[1]
        rule = self.policy.rule_for(key[0])
        if rule is None or port not in rule.ports:
            return self.policy.decide(*key)  # refused by name or port, without a lookup
        pending = self._pending.get(key[0])
        if pending is None:  # one lookup per name at a time, whatever the port and however many wait
            loop = asyncio.get_running_loop()
            pending = self._pending[key[0]] = loop.run_in_executor(self._resolving, self.policy.lookup, *key)
            pending.add_done_callback(lambda _: self._pending.pop(key[0], None))
        try:
            found = await asyncio.wait_for(asyncio.shield(pending), self.dns_timeout)
        except asyncio.TimeoutError:
            # Remembered like any other decision, so a request that asks again is refused at once.
            decision = Decision(False, "dns", f"{key[0]} did not resolve within {self.dns_timeout:g} s")
        else:
            decision = self.policy.decide(*key, found)
        self._decisions[key] = (time.monotonic(), decision)
        if len(self._decisions) > 4096:  # drop the stale ones now and then
            now = time.monotonic()
            self._decisions = {k: v for k, v in self._decisions.items() if now - v[0] < DECISION_TTL}
        return decision

    def destination(self, flow: http.HTTPFlow) -> tuple[str, int] | str:
        """Where this request goes, or why it is refused: every name it carries must agree.

        Inside a CONNECT tunnel the tunnel's authority is the destination, and the TLS server name,
        `Host`/`:authority` and the request target's authority must all name it. A plain proxy request
        goes to its target's host, which `Host` must name too.
        """
        request = flow.request
        tunnel = self._tunnels.get(flow.client_conn.id)
        host, port = tunnel if tunnel else (_name(request.host), request.port)
        if flow.client_conn.id in self._mismatched:
            return f"the TLS server name does not name {host}, the host of this passthrough tunnel"
        names: list[tuple[str, str]] = [("the request target", request.authority)]
        names += [("Host", value) for value in request.headers.get_all("host")]
        if flow.client_conn.tls:
            names.append(("the TLS server name", flow.client_conn.sni or ""))
        for what, value in names:
            if not value:
                continue
            named = _authority(value)
            if named is None:
                return f"{what} is not a host name and port"  # its text may hold anything: it is not echoed
            if named[0] != host or named[1] not in (None, port):
                shown = named[0] if named[1] is None else f"{named[0]}:{named[1]}"
                return f"{what} names {shown} but the request goes to {host}:{port}"
        if not (request.path.startswith("/") or (request.path == "*" and request.method == "OPTIONS")):
            return "the request target is not a path on its host"
        return host, port

    def verified_tls(self, flow: http.HTTPFlow, host: str) -> bool:
        """Whether this request travels only over TLS the bundle opens to `host` and verifies for `host`."""
        tunnel = self._tunnels.get(flow.client_conn.id)
        return (
            tunnel is not None
            and tunnel[0] == host
            and flow.client_conn.id not in self._passthrough
            and flow.client_conn.tls
            and flow.server_conn.tls
            and flow.server_conn.sni == host
            and flow.request.scheme == "https"
        )

    # -- the audit log: exactly one line per request

    def _log(self, flow: http.HTTPFlow | None, outcome: Decision | None, **fields: Any) -> None:
        """Write the audit line for `flow` (once), or for an event without a flow; `outcome` fills the verdict."""
        if flow is not None:
            if flow.metadata.get("bottle_logged"):
                return
            flow.metadata["bottle_logged"] = True
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        if outcome is not None:
            entry |= {"decision": "allow" if outcome.allowed else "deny", "rule": outcome.rule}
            if not outcome.allowed:
                entry["reason"] = outcome.reason
        self.audit(entry)

    def log_tunnel(self, host: str, port: int, decision: Decision) -> None:
        """The line of a tunnel with no flow to carry it: granted (status 200), or refused when it connected."""
        if decision.allowed:
            sizes: dict[str, Any] = {"status": 200, "bytes_out": None, "bytes_in": None}
        else:
            sizes = {"status": None, "bytes_out": 0, "bytes_in": 0}
        self._log(None, decision, method="CONNECT", host=host, port=port, path="", **sizes)

    def log_tunnel_error(self, host: str | None, port: int | None, error: object, rule: str | None) -> None:
        """The line of a tunnel with no flow to carry it, whose upstream could not be reached."""
        self._log(None, None, method="CONNECT", host=host, port=port, path="", decision="error", rule=rule,
                  reason=self._safe(error), status=None, bytes_out=0, bytes_in=0)  # fmt: skip

    def _safe(self, error: object) -> str:
        """An error as the log may keep it: no secret, and none of the bytes mitmproxy quotes (an upstream
        can reflect a header into them, an agent can put a token there)."""
        text = str(error)
        for value in self.secrets.values():
            text = text.replace(value, "REDACTED")
        return _QUOTED.sub("(data withheld)", text)[:300]

    def _where(self, flow: http.HTTPFlow) -> dict[str, Any]:
        request = flow.request
        tunnel = self._tunnels.get(flow.client_conn.id)
        host, port = tunnel if tunnel and request.method != "CONNECT" else (_name(request.host), request.port)
        return {"method": request.method, "host": host, "port": port, "path": redact_path(request.path)}

    def _refuse(self, flow: http.HTTPFlow, decision: Decision) -> None:
        body = f"bottle: refused: {decision.reason} (rule: {decision.rule})\n"
        flow.response = http.Response.make(403, body, {"content-type": "text/plain; charset=utf-8"})
        self._log(flow, decision, **self._where(flow), status=403, bytes_out=0, bytes_in=0)

    # -- mitmproxy's hooks

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.request.port in DNS_PORTS:  # mitmproxy relays these as DNS, past the HTTP layer
            reason = f"port {flow.request.port} is DNS, which the bundle never tunnels"
            self._refuse(flow, Decision(False, "dns port", reason))
            return
        decision = await self.decide(flow.request.host, flow.request.port)
        if not decision.allowed:
            self._refuse(flow, decision)
            return
        self.open_tunnel(flow.client_conn.id, host=flow.request.host, port=flow.request.port, decision=decision)
        # The tunnel gets its own line (each request inside an intercepted one gets one more).
        self._log(flow, decision, **self._where(flow), status=200, bytes_out=None, bytes_in=None)

    def open_tunnel(self, client_id: str, *, host: str, port: int, decision: Decision) -> None:
        """Make client_id's connection a CONNECT tunnel to host:port, which `decision` allowed."""
        self._tunnels[client_id] = (_name(host), port)
        if not decision.intercept:
            self._passthrough.add(client_id)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        tunnel = self._tunnels.get(data.context.client.id)
        if tunnel is None:
            return
        if data.context.client.id in self._passthrough and _name(data.client_hello.sni or "") == tunnel[0]:
            data.ignore_connection = True  # tunnelled as is: the agent's TLS, to the name it tunnelled to
            self._relayed.add(data.context.client.id)
            return
        # Intercepted. A passthrough whose server name does not match (or is missing) is intercepted so
        # that its requests are refused with a 403 and logged. Upstream TLS names and verifies the
        # tunnel's host, whatever name the agent sent.
        if data.context.client.id in self._passthrough:
            self._passthrough.discard(data.context.client.id)
            self._mismatched.add(data.context.client.id)
        data.context.server.sni = tunnel[0]

    async def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        where = self.destination(flow)
        if isinstance(where, str):
            self._refuse(flow, Decision(False, "destination mismatch", where))
            return
        host, port = where
        decision = await self.decide(host, port)
        if not decision.allowed:
            self._refuse(flow, decision)
            return
        if self._tunnels.get(flow.client_conn.id):
            # mitmproxy reuses one of this tunnel's upstream connections only for a request whose host and port
            # are that connection's address, which server_connect pins to the checked IP. Naming the checked IP
            # here keeps a kept-alive tunnel on one upstream connection while its host still resolves there, and
            # opens (and checks) a new one when it does not. Every connection of a tunnel is to the tunnel's host
            # with TLS verified for it (server_connect), so no request rides on TLS verified for another name.
            request.data.host = str(decision.address)
        if not (request.is_http2 or request.is_http3):
            request.authority = ""  # origin-form upstream: the target carries no authority of its own
        credentials = self.policy.headers_for(host, self.secrets)
        if credentials and decision.intercept and self.verified_tls(flow, host):
            for header, value in credentials.items():
                request.headers[header] = value  # replaces whatever the agent sent under that name
        else:
            for header in credentials:
                request.headers.pop(header, None)  # never pass on a guess at the secret, either
        flow.metadata["bottle_decision"] = decision

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        plain = "bottle_decision" in flow.metadata and flow.client_conn.id not in self._tunnels
        if plain and flow.response is not None and flow.response.status_code != 101:  # 101: a protocol switch
            # A plain proxy request's upstream connection is never reused (its address is the checked IP, the
            # request names the host), and mitmproxy holds at most five open to one address per client: with
            # servers that keep connections alive, the sixth request would wait forever. Each one is closed
            # after its response instead, and so is the agent's connection, which it opens anew.
            flow.response.headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        decision = flow.metadata.get("bottle_decision")
        if decision is None or flow.response is None:
            return  # refused above, and logged there
        request = flow.request
        sizes = {"bytes_out": len(request.raw_content or b""), "bytes_in": len(flow.response.raw_content or b"")}
        self._log(flow, decision, **self._where(flow), status=flow.response.status_code, **sizes)

    def error(self, flow: http.HTTPFlow) -> None:
        decision = flow.metadata.get("bottle_decision")
        failed = {"decision": "error", "rule": decision.rule if decision else None, "reason": self._safe(flow.error)}
        self._log(flow, None, **self._where(flow), **failed, status=None, bytes_out=0, bytes_in=0)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        self.log_tls_failed(*(self._tunnels.get(data.context.client.id) or (None, None)), data.conn.error)

    def log_head_too_large(self, client_id: str, *, limit: int) -> None:
        """The line of a request whose head went over `limit` bytes, refused before it was whole."""
        host, port = self._tunnels.get(client_id) or (None, None)
        reason = f"the request head is over {limit} bytes"
        self._log(None, Decision(False, "head too large", reason), method="HTTP", host=host, port=port, path="",
                  status=431, bytes_out=0, bytes_in=0)  # fmt: skip

    def log_tls_failed(self, host: str | None, port: int | None, error: object) -> None:
        """The line of an agent whose TLS handshake with the bundle failed (in a tunnel to host:port)."""
        reason = f"the agent's TLS handshake with the bundle failed: {self._safe(error)}"
        failed = {"decision": "error", "rule": None, "reason": reason}
        self._log(None, None, method="TLS", host=host, port=port, path="", **failed, status=None, bytes_out=0,
                  bytes_in=0)  # fmt: skip

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None:
            return
        # In a tunnel the destination is the tunnel's host, whatever the address says by now (we pin it to
        # an IP, and mitmproxy copies that onto a reconnect); outside one it is the request's host.
        host, port = self._tunnels.get(data.client.id) or data.server.address
        decision = await self.decide(str(host), int(port))
        if not decision.allowed:
            data.server.error = f"bottle: refused: {decision.reason}"
            if data.client.id in self._relayed:  # no HTTP flow will report it
                self.log_tunnel(str(host), int(port), decision)
            return
        data.server.address = (str(decision.address), port)  # connect to exactly the address we checked
        if data.client.id in self._tunnels:
            data.server.sni = host  # the tunnel's host names and verifies the upstream TLS, never the address

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.client.id in self._relayed:
            if not str(data.server.error or "").startswith("bottle: refused"):
                host, port = self._tunnels.get(data.client.id) or data.server.address or (None, None)
                self.log_tunnel_error(host, port, data.server.error, rule=None)
        else:
            self._forget_failed(data.client.id, data.server)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.error:  # its TLS handshake failed, say: it is closed by now
            self._forget_failed(data.client.id, data.server)

    def _forget_failed(self, client_id: str, server: connection.Server) -> None:
        """mitmproxy keeps a connection whose connect or TLS handshake failed, and answers every later request
        for its address with that error. A tunnel's requests name the checked address, so one failure would
        stick for the life of the tunnel (an HTTP/2 client's above all); with no address, the next request
        connects, and is checked, anew."""
        if client_id in self._tunnels and client_id not in self._relayed:
            server.address = None

    def is_agent(self, peer: IPAddress | None) -> bool:
        """Whether a client at `peer` may use the proxy: the agent's address, or any with none configured."""
        clients = self.policy.config.clients
        return not clients or (peer is not None and any(peer in network for network in clients))

    def admits(self, peername: Any) -> bool:
        """Whether a client at `peername` gets past both mitmproxy's Block (block_global) and `client_connected`."""
        peer = _peer(peername)
        return peer is not None and (peer.is_loopback or not peer.is_global) and self.is_agent(peer)

    def client_connected(self, client: connection.Client) -> None:
        peer = _peer(client.peername)
        if self.is_agent(peer):
            return
        client.error = "bottle: refused: not the agent's address"
        self._log(None, None, event="client", decision="refused", client=str(peer),
                  reason=f"{peer} is not on the agent's network; only the agent may use this proxy (bottle up's "
                         "readiness check, from the host, is refused this way too)")  # fmt: skip

    def client_disconnected(self, client: connection.Client) -> None:
        self._tunnels.pop(client.id, None)
        self._passthrough.discard(client.id)
        self._relayed.discard(client.id)
        self._mismatched.discard(client.id)
