"""FakeDocker: a real `docker.DockerClient` whose HTTP transport is an in-memory Docker Engine.

docker-py's own code builds every request and turns every error response into its usual exception
(`NotFound`, `APIError` with the Engine's status and message), so code under test cannot tell the
difference for the endpoints implemented here. What the fake engine answers follows dockerd 20.10
(API 1.41), the messages copied from the real daemon. Unimplemented endpoints answer 501 loudly.
"""

from __future__ import annotations

import http
import ipaddress
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import docker
import requests
from requests.adapters import BaseAdapter

API_VERSION = "1.41"
ENGINE_VERSION = "20.10.24"
# dockerd's default address pools: 172.17-31.0.0/16, then 192.168.0.0/16 in /20s.
_DEFAULT_POOLS = [ipaddress.ip_network(f"172.{i}.0.0/16") for i in range(17, 32)] + list(
    ipaddress.ip_network("192.168.0.0/16").subnets(new_prefix=20)
)


class EngineError(Exception):
    """An error response: the HTTP status and the Engine's message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Call:
    """One request the engine received, for tests that check call shapes."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class FakeEngine:
    """The engine's state and its request router; thread-safe."""

    networks: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _subnets: dict[str, list[Any]] = field(default_factory=dict)  # parsed IPAM subnets by network ID
    _failures: list[tuple[str, re.Pattern[str], EngineError]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self._add_network("bridge", "bridge", [{"Subnet": "172.17.0.0/16"}], {})  # as dockerd lists it
        self._add_network("host", "host", [], {})
        self._add_network("none", "null", [], {})

    # -- test controls ---------------------------------------------------------------------------------

    def fail_next(self, method: str, path_pattern: str, status: int, message: str) -> None:
        """Make the next request matching `method` and the `path_pattern` regex fail with this error."""
        self._failures.append((method.upper(), re.compile(path_pattern), EngineError(status, message)))

    # -- routing ---------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        routes = [
            ("GET", r"/_ping", self._ping),
            ("GET", r"/version", self._version),
            ("GET", r"/networks", self._list_networks),
            ("POST", r"/networks/create", self._create_network),
            ("GET", r"/networks/(?P<ref>[^/]+)", self._inspect_network),
            ("DELETE", r"/networks/(?P<ref>[^/]+)", self._remove_network),
        ]
        with self._lock:
            self.calls.append(Call(method, path, query, body))
            for i, (fail_method, pattern, error) in enumerate(self._failures):
                if fail_method == method and pattern.fullmatch(path):
                    del self._failures[i]
                    return error.status, {"message": error.message}
            for route_method, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    try:
                        return handler(query=query, body=body, **match.groupdict())
                    except EngineError as exc:
                        return exc.status, {"message": exc.message}
            return 501, {"message": f"the fake Docker Engine does not implement {method} {path}"}

    def _ping(self, **_: Any) -> tuple[int, Any]:
        return 200, "OK"

    def _version(self, **_: Any) -> tuple[int, Any]:
        return 200, {"Version": ENGINE_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": "1.12", "Os": "linux"}

    # -- networks --------------------------------------------------------------------------------------

    def _add_network(self, name: str, driver: str, config: list[dict], labels: dict[str, str]) -> dict[str, Any]:
        network_id = secrets.token_hex(32)
        attrs = {
            "Name": name,
            "Id": network_id,
            "Created": "2026-01-01T00:00:00.000000000Z",
            "Scope": "local",
            "Driver": driver,
            "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": config},
            "Internal": False,
            "Attachable": False,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": {},
            "Options": {},
            "Labels": labels,
        }
        self.networks[network_id] = attrs
        self._subnets[network_id] = [ipaddress.ip_network(c["Subnet"]) for c in config]
        return attrs

    def find_network(self, ref: str) -> dict[str, Any]:
        """Resolve a network by full ID, name or unique ID prefix, as dockerd does."""
        if ref in self.networks:
            return self.networks[ref]
        by_name = [n for n in self.networks.values() if n["Name"] == ref]
        by_prefix = [n for i, n in self.networks.items() if i.startswith(ref)]
        for candidates in (by_name, by_prefix):
            if len(candidates) == 1:
                return candidates[0]
        raise EngineError(404, f"network {ref} not found")

    def _list_networks(self, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        filters = _parse_filters(query)
        for key in filters:
            if key not in {"label", "name", "id", "driver"}:
                raise EngineError(400, f"Invalid filter '{key}'")
        result = [
            n
            for n in self.networks.values()
            if _labels_match(n["Labels"], filters.get("label", []))
            and all(re.search(v, n["Name"]) for v in filters.get("name", []))
            and all(re.search(v, n["Id"]) for v in filters.get("id", []))
            and all(v == n["Driver"] for v in filters.get("driver", []))
        ]
        return 200, result

    def _inspect_network(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, self.find_network(ref)

    def _create_network(self, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        name = body.get("Name") or ""
        if not name:
            raise EngineError(400, "network name is required")
        driver = body.get("Driver") or "bridge"
        if driver != "bridge":
            raise EngineError(501, f"the fake Docker Engine only implements the bridge driver, not {driver!r}")
        if body.get("CheckDuplicate") and any(n["Name"] == name for n in self.networks.values()):
            raise EngineError(409, f"network with name {name} already exists")
        requested = (body.get("IPAM") or {}).get("Config") or []
        subnets = [_parse_subnet(c.get("Subnet", "")) for c in requested]
        in_use = [u for parsed in self._subnets.values() for u in parsed]
        if any(s.overlaps(u) for s in subnets for u in in_use):  # dockerd checks this before the gateway
            raise EngineError(403, "Pool overlaps with other one on this address space")
        config = [_ipam_entry(s, c.get("Gateway")) for s, c in zip(subnets, requested)]
        if not config:
            free = next((p for p in _DEFAULT_POOLS if not any(p.overlaps(u) for u in in_use)), None)
            if free is None:
                raise EngineError(
                    400, "could not find an available, non-overlapping IPv4 address pool among the defaults "
                    "to assign to the network"
                )
            config = [{"Subnet": str(free), "Gateway": str(free.network_address + 1)}]
        attrs = self._add_network(name, driver, config, dict(body.get("Labels") or {}))
        return 201, {"Id": attrs["Id"], "Warning": ""}

    def _remove_network(self, ref: str, **_: Any) -> tuple[int, Any]:
        network = self.find_network(ref)
        if network["Name"] in {"bridge", "host", "none"}:
            raise EngineError(403, f"{network['Name']} is a pre-defined network and cannot be removed")
        if network["Containers"]:
            raise EngineError(
                403, f"error while removing network: network {network['Name']} id {network['Id']} has active endpoints"
            )
        del self.networks[network["Id"]], self._subnets[network["Id"]]
        return 204, None


def _parse_filters(query: dict[str, list[str]]) -> dict[str, list[str]]:
    raw = json.loads(query.get("filters", ["{}"])[0] or "{}")
    # The Engine accepts both {"label": ["a=b"]} and the older {"label": {"a=b": true}}.
    return {k: list(v) if isinstance(v, list) else [i for i, on in v.items() if on] for k, v in raw.items()}


def _labels_match(labels: dict[str, str], wanted: list[str]) -> bool:
    for term in wanted:
        key, sep, value = term.partition("=")
        if key not in labels or (sep and labels[key] != value):
            return False
    return True


def _parse_subnet(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        raise EngineError(500, f"Invalid subnet {text} : invalid CIDR address: {text}") from None


def _ipam_entry(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network, gateway: str | None) -> dict[str, str]:
    if gateway and ipaddress.ip_address(gateway) not in subnet:
        raise EngineError(500, f"failed to allocate gateway ({gateway}): Requested address is out of range")
    # dockerd records a gateway only when one was asked for (it still assigns .1 on the bridge).
    return {"Subnet": str(subnet), "Gateway": gateway} if gateway else {"Subnet": str(subnet)}


class _EngineAdapter(BaseAdapter):
    """A requests transport that hands each request to a FakeEngine instead of a socket."""

    def __init__(self, engine: FakeEngine):
        super().__init__()
        self.engine = engine

    def send(self, request: requests.PreparedRequest, **_: Any) -> requests.Response:
        url = urlsplit(request.url)
        path = re.sub(r"^/v[0-9.]+", "", url.path)
        body = json.loads(request.body) if request.body else None
        status, payload = self.engine.handle(request.method or "GET", path, parse_qs(url.query), body)
        response = requests.Response()
        response.status_code = status
        response.reason = http.HTTPStatus(status).phrase
        response.url = request.url or ""
        response.request = request
        if isinstance(payload, str):
            response._content = payload.encode()
            response.headers["Content-Type"] = "text/plain; charset=utf-8"
        elif payload is not None:
            response._content = json.dumps(payload).encode()
            response.headers["Content-Type"] = "application/json"
        else:
            response._content = b""
        return response

    def close(self) -> None:
        pass


class FakeDocker(docker.DockerClient):
    """A DockerClient backed by an in-memory engine (`.engine`), for unit tests and plugin authors."""

    def __init__(self, engine: FakeEngine | None = None):  # noqa: super().__init__ would dial a socket
        self.engine = engine or FakeEngine()
        self.api = docker.APIClient(base_url="unix:///nonexistent/fake-docker.sock", version=API_VERSION)
        self.api.mount("http+docker://", _EngineAdapter(self.engine))
