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
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # by "repo:tag"
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

    def add_image(self, tag: str) -> None:
        """Make an image present, as `docker build` or `docker load` would."""
        self.images[tag if ":" in tag.rsplit("/", 1)[-1] else f"{tag}:latest"] = {
            "Id": f"sha256:{secrets.token_hex(32)}",
            "RepoTags": [tag],
        }

    # -- routing ---------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        routes = [
            ("GET", r"/_ping", self._ping),
            ("GET", r"/version", self._version),
            ("GET", r"/networks", self._list_networks),
            ("POST", r"/networks/create", self._create_network),
            ("GET", r"/networks/(?P<ref>[^/]+)", self._inspect_network),
            ("DELETE", r"/networks/(?P<ref>[^/]+)", self._remove_network),
            ("POST", r"/networks/(?P<ref>[^/]+)/connect", self._connect),
            ("GET", r"/info", self._info),
            ("GET", r"/images/(?P<ref>.+)/json", self._inspect_image),
            ("GET", r"/containers/json", self._list_containers),
            ("POST", r"/containers/create", self._create_container),
            ("GET", r"/containers/(?P<ref>[^/]+)/json", self._inspect_container),
            ("POST", r"/containers/(?P<ref>[^/]+)/start", self._start_container),
            ("POST", r"/containers/(?P<ref>[^/]+)/stop", self._stop_container),
            ("POST", r"/containers/(?P<ref>[^/]+)/wait", self._wait_container),
            ("GET", r"/containers/(?P<ref>[^/]+)/logs", self._container_logs),
            ("DELETE", r"/containers/(?P<ref>[^/]+)", self._remove_container),
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

    def _info(self, **_: Any) -> tuple[int, Any]:
        return 200, {"ServerVersion": ENGINE_VERSION, "Runtimes": {"runc": {"path": "runc"}}, "DefaultRuntime": "runc"}

    def _version(self, **_: Any) -> tuple[int, Any]:
        return 200, {"Version": ENGINE_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": "1.12", "Os": "linux"}

    # -- networks --------------------------------------------------------------------------------------

    def _add_network(
        self, name: str, driver: str, config: list[dict], labels: dict[str, str], *, internal: bool = False,
        options: dict[str, str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        network_id = secrets.token_hex(32)
        attrs = {
            "Name": name,
            "Id": network_id,
            "Created": "2026-01-01T00:00:00.000000000Z",
            "Scope": "local",
            "Driver": driver,
            "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": config},
            "Internal": internal,
            "Attachable": False,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": {},
            "Options": options or {},
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
        attrs = self._add_network(
            name, driver, config, dict(body.get("Labels") or {}), internal=bool(body.get("Internal")),
            options=dict(body.get("Options") or {}),
        )  # fmt: skip
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

    # -- images and containers ---------------------------------------------------------------------------

    def _image(self, ref: str) -> dict[str, Any] | None:
        return self.images.get(ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest")

    def _inspect_image(self, ref: str, **_: Any) -> tuple[int, Any]:
        image = self._image(ref)
        if image is None:
            raise EngineError(404, f"no such image: {ref}: No such image: {ref}")
        return 200, image

    def find_container(self, ref: str) -> dict[str, Any]:
        """Resolve a container by full ID, name (with or without its '/'), or unique ID prefix."""
        if ref in self.containers:
            return self.containers[ref]
        by_name = [c for c in self.containers.values() if c["Name"] == f"/{ref.lstrip('/')}"]
        by_prefix = [c for i, c in self.containers.items() if i.startswith(ref)]
        for candidates in (by_name, by_prefix):
            if len(candidates) == 1:
                return candidates[0]
        raise EngineError(404, f"No such container: {ref}")

    def _create_container(self, query: dict[str, list[str]], body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        name = query.get("name", [""])[0]
        if self._image(body["Image"]) is None:
            raise EngineError(404, f"No such image: {body['Image']}")
        taken = [c for c in self.containers.values() if name and c["Name"] == f"/{name}"]
        if taken:
            raise EngineError(
                409,
                f'Conflict. The container name "/{name}" is already in use by container "{taken[0]["Id"]}". '
                "You have to remove (or rename) that container to be able to reuse that name.",
            )
        container_id = secrets.token_hex(32)
        host = body.get("HostConfig") or {}
        endpoints = dict((body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {})
        mode = host.get("NetworkMode")
        if mode and mode not in {"default", "bridge", "host", "none"} and not mode.startswith("container:"):
            endpoints.setdefault(mode, {})  # the Engine attaches the container to its NetworkMode network
        if mode and mode.startswith("container:"):
            self.find_container(mode.removeprefix("container:"))  # joins that container's namespace
        host = {"LogConfig": {"Type": "json-file", "Config": {}}} | host
        self.containers[container_id] = {
            "Id": container_id,
            "Name": f"/{name or container_id[:12]}",
            "Image": self._image(body["Image"])["Id"],
            "Config": {
                "Image": body["Image"],
                "Labels": dict(body.get("Labels") or {}),
                "Cmd": body.get("Cmd"),
                "Tty": bool(body.get("Tty")),
            },
            "State": {"Status": "created", "Running": False, "ExitCode": 0},
            "HostConfig": host,
            "Mounts": [_mount(b) for b in host.get("Binds") or []],
            "NetworkSettings": {
                "Networks": {net: {"IPAMConfig": (e or {}).get("IPAMConfig"), "IPAddress": ""} for net, e in endpoints.items()}
            },
        }
        return 201, {"Id": container_id, "Warnings": []}

    def _inspect_container(self, ref: str, **_: Any) -> tuple[int, Any]:
        return 200, self.find_container(ref)

    def _start_container(self, ref: str, **_: Any) -> tuple[int, Any]:
        container = self.find_container(ref)
        if container["State"]["Running"]:
            return 304, None
        for net_name, endpoint in container["NetworkSettings"]["Networks"].items():
            self._join(container, self.find_network(net_name), endpoint)
        container["State"].update(Status="running", Running=True)
        return 204, None

    def _join(self, container: dict[str, Any], network: dict[str, Any], endpoint: dict[str, Any]) -> None:
        """Give a running container its address on `network`: the one asked for, or the next free one."""
        subnet = next(iter(self._subnets[network["Id"]]), None)
        used = {c["IPv4Address"].split("/")[0] for c in network["Containers"].values()}
        wanted = ((endpoint.get("IPAMConfig") or {}).get("IPv4Address")) or next(
            str(h) for h in list(subnet.hosts())[1:] if str(h) not in used
        )
        if subnet is None or ipaddress.ip_address(wanted) not in subnet:
            raise EngineError(500, f"Invalid address {wanted}: It does not belong to any of this network's subnets")
        if wanted in used:
            raise EngineError(403, "Address already in use")
        network["Containers"][container["Id"]] = {
            "Name": container["Name"].lstrip("/"),
            "IPv4Address": f"{wanted}/{subnet.prefixlen}",
        }
        endpoint.update(IPAddress=wanted, NetworkID=network["Id"])

    def _connect(self, ref: str, body: dict[str, Any], **_: Any) -> tuple[int, Any]:
        network = self.find_network(ref)
        container = self.find_container(body["Container"])
        networks = container["NetworkSettings"]["Networks"]
        if network["Name"] in networks and container["State"]["Running"]:  # (a created one is just updated)
            raise EngineError(
                403, f"endpoint with name {container['Name'].lstrip('/')} already exists in network {network['Name']}"
            )
        endpoint = {"IPAMConfig": (body.get("EndpointConfig") or {}).get("IPAMConfig"), "IPAddress": ""}
        if container["State"]["Running"]:
            self._join(container, network, endpoint)
        networks[network["Name"]] = endpoint
        return 200, None

    def _wait_container(self, ref: str, **_: Any) -> tuple[int, Any]:
        """A fake container's process ends as soon as it is waited for, successfully."""
        container = self.find_container(ref)
        self._detach(container)
        container["State"].update(Status="exited", Running=False, ExitCode=0)
        return 200, {"StatusCode": 0, "Error": None}

    def _detach(self, container: dict[str, Any]) -> None:
        for network in self.networks.values():
            network["Containers"].pop(container["Id"], None)

    def _stop_container(self, ref: str, **_: Any) -> tuple[int, Any]:
        container = self.find_container(ref)
        if not container["State"]["Running"]:
            return 304, None
        self._detach(container)
        container["State"].update(Status="exited", Running=False)
        return 204, None

    def _container_logs(self, ref: str, **_: Any) -> tuple[int, Any]:
        self.find_container(ref)
        return 200, b""  # a fake container prints nothing

    def _remove_container(self, ref: str, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        container = self.find_container(ref)
        if container["State"]["Running"] and query.get("force", ["false"])[0] not in {"1", "true", "True"}:
            raise EngineError(
                409,
                f"You cannot remove a running container {container['Id']}. "
                "Stop the container before attempting removal or force remove",
            )
        self._detach(container)
        del self.containers[container["Id"]]
        return 204, None

    def _list_containers(self, query: dict[str, list[str]], **_: Any) -> tuple[int, Any]:
        filters = _parse_filters(query)
        for key in filters:
            if key not in {"label", "name", "id", "status", "network"}:
                raise EngineError(400, f"Invalid filter '{key}'")
        show_all = query.get("all", ["0"])[0] in {"1", "true", "True"}

        def on_network(container: dict[str, Any], ref: str) -> bool:
            # By name, started or not; by ID only once started (dockerd fills in NetworkID at start).
            networks = container["NetworkSettings"]["Networks"].items()
            return any(ref in {name, endpoint.get("NetworkID")} for name, endpoint in networks)

        result = [
            {
                "Id": c["Id"],
                "Names": [c["Name"]],
                "Image": c["Config"]["Image"],
                "Labels": c["Config"]["Labels"],
                "State": c["State"]["Status"],
            }
            for c in reversed(self.containers.values())  # newest first, as dockerd lists them
            if (show_all or c["State"]["Running"])
            and _labels_match(c["Config"]["Labels"], filters.get("label", []))
            and all(re.search(v, c["Name"]) for v in filters.get("name", []))
            and all(c["Id"].startswith(v) for v in filters.get("id", []))
            and all(v == c["State"]["Status"] for v in filters.get("status", []))
            and all(on_network(c, v) for v in filters.get("network", []))
        ]
        return 200, result


def _mount(bind: str) -> dict[str, Any]:
    source, destination, *mode = bind.split(":")
    return {"Type": "bind", "Source": source, "Destination": destination, "RW": "ro" not in mode}


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
        if isinstance(payload, bytes):
            response._content = payload
            response.headers["Content-Type"] = "application/vnd.docker.raw-stream"
        elif isinstance(payload, str):
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
