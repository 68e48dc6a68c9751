"""bottle's policy as a mitmproxy addon: allow or refuse, inject credentials, write the audit log.

Every check happens before any packet leaves for the destination (the proxy runs with
`connection_strategy=lazy`): CONNECT and plain requests are checked by name and resolved address, and
`server_connect` resolves and checks once more and pins the connection to the address it checked, so a
name that re-resolves to somewhere else between the two (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import http, tls
from mitmproxy.net.http import url
from mitmproxy.proxy import server_hooks

from bottle.bundle.policy import Decision, Policy, redact_query

AuditSink = Callable[[dict[str, Any]], None]


def stdout_sink(entry: dict[str, Any]) -> None:
    """One JSON line per entry on stdout: `bottle logs` reads it back with `docker logs`."""
    sys.stdout.write(json.dumps(entry, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _host_of(authority: str | None) -> str | None:
    """The host in a Host header or :authority (without port or brackets), lower-case."""
    if not authority:
        return None
    try:
        host, _ = url.parse_authority(authority, check=False)
    except ValueError:
        return authority.lower()
    return host.lower().rstrip(".")


class BottlePolicy:
    """The mitmproxy addon. `secrets` maps secret names to values; they are only ever put in headers."""

    def __init__(self, policy: Policy, secrets: dict[str, str], audit: AuditSink = stdout_sink):
        self.policy = policy
        self.secrets = secrets
        self.audit = audit

    def _log(self, decision: Decision | None, **fields: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        if decision is not None:
            entry |= {"decision": "allow" if decision.allowed else "deny", "rule": decision.rule}
            if not decision.allowed:
                entry["reason"] = decision.reason
        self.audit(entry)

    def _refuse(self, flow: http.HTTPFlow, decision: Decision, path: str) -> None:
        body = f"bottle: refused: {decision.reason} (rule: {decision.rule})\n"
        flow.response = http.Response.make(403, body, {"content-type": "text/plain; charset=utf-8"})
        request = flow.request
        self._log(decision, method=request.method, host=request.host, port=request.port, path=path,
                  status=403, bytes_out=0, bytes_in=0)  # fmt: skip

    def http_connect(self, flow: http.HTTPFlow) -> None:
        decision = self.policy.decide(flow.request.host, flow.request.port)
        if not decision.allowed:
            self._refuse(flow, decision, "")
        elif not decision.intercept:
            request = flow.request
            self._log(decision, method="CONNECT", host=request.host, port=request.port, path="", status=200,
                      bytes_out=None, bytes_in=None)  # fmt: skip

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address
        rule = self.policy.rule_for(address[0].lower()) if address else None
        if rule is not None and not rule.intercept:
            data.ignore_connection = True  # tunnelled as is: the agent's TLS goes straight to the host

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        named = _host_of(request.host_header)
        if named and named != request.host.lower().rstrip("."):
            # Domain fronting: the connection goes to one host while the request names another.
            reason = f"the request names {named} but its connection is to {request.host}"
            self._refuse(flow, Decision(False, "host mismatch", reason), redact_query(request.path))
            return
        decision = self.policy.decide(request.host, request.port)
        if not decision.allowed:
            self._refuse(flow, decision, redact_query(request.path))
            return
        for header, value in self.policy.headers_for(request.host, self.secrets).items():
            request.headers[header] = value  # replaces whatever the agent sent under that name
        flow.metadata["bottle_decision"] = decision

    def response(self, flow: http.HTTPFlow) -> None:
        decision = flow.metadata.get("bottle_decision")
        if decision is None or flow.response is None:
            return  # refused above, and logged there
        request = flow.request
        self._log(decision, method=request.method, host=request.host, port=request.port,
                  path=redact_query(request.path), status=flow.response.status_code,
                  bytes_out=len(request.raw_content or b""), bytes_in=len(flow.response.raw_content or b""))  # fmt: skip

    def error(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        self._log(None, method=request.method, host=request.host, port=request.port,
                  path=redact_query(request.path), decision="error", reason=str(flow.error))  # fmt: skip

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None:
            return
        host, port = data.server.address
        decision = self.policy.decide(str(host), int(port))
        if not decision.allowed:
            data.server.error = f"bottle: refused: {decision.reason}"
            self._log(decision, method="CONNECT", host=host, port=port, path="", status=None)
            return
        data.server.address = (str(decision.address), port)  # connect to exactly the address we checked
