"""The bundle's egress policy: which destinations the agent may reach, decided without any socket.

The config is rendered by `prepare` on the host and loaded (and validated) by the bundle; a config
that does not validate stops the bundle, it never falls back to allowing everything. A request is
allowed only when its host matches an allow rule on an allowed port *and* every address the host
resolves to is public, or inside a private CIDR that rule opts in. Loopback, link-local (cloud
metadata included), the bottle's own subnet and its docker gateway are refused whatever the rules say.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

# Never reachable through the bundle, whatever a rule opts in.
NEVER = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "fe80::/10", "fec0::/10", "ff00::/8",
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): its IPv4 may sit anywhere in the address
        "100.100.100.200/32", "fd00:ec2::254/128",  # cloud metadata services inside opt-in ranges
        "168.63.129.16/32",  # Azure's WireServer: a public address that hands VMs their provisioning secrets
    )
]  # fmt: skip
# IPv6 forms that carry an IPv4 address; the IPv4 inside is checked as if it had been resolved itself.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")  # IPv4-compatible (deprecated)
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT IPv4-translated
# Private ranges a rule may opt a CIDR inside of.
OPT_IN_ALLOWED = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


def _host(value: str) -> str:
    host = value.strip().lower().rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare or any(not label for label in bare.split(".")):
        raise ValueError(f"'{value}' is not a host name or '*.suffix' wildcard")
    return host


def _opt_in(network: IPNetwork) -> IPNetwork:
    if not any(network.subnet_of(allowed) for allowed in OPT_IN_ALLOWED if allowed.version == network.version):
        raise ValueError(f"{network} is not inside a private range; only private CIDRs can be opted in")
    return network


def _template(value: str) -> str:
    if value.count("{secret}") != 1 or not is_header_value(value.replace("{secret}", "x")):
        raise ValueError("must hold '{secret}' once and no control characters")
    return value


def is_header_value(value: object) -> bool:
    """Whether `value` can go in an HTTP header as it is: a non-empty string without CR, LF or NUL."""
    return isinstance(value, str) and value != "" and value.isprintable()


Host = Annotated[str, AfterValidator(_host)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(_Frozen):
    """One allowed destination: a host or `*.suffix`, its ports, and private CIDRs it may resolve into."""

    host: Host
    ports: list[Annotated[int, Field(strict=True, gt=0, lt=65536)]] = Field(default_factory=lambda: [443, 80],
                                                                            min_length=1)  # fmt: skip
    cidrs: list[Annotated[IPNetwork, AfterValidator(_opt_in)]] = Field(default_factory=list)
    intercept: bool = True  # False: CONNECT is tunnelled without TLS interception (no injection, less audit)

    def matches(self, host: str) -> bool:
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    @property
    def label(self) -> str:
        return f"{self.host}:{','.join(map(str, self.ports))}"


class Credential(_Frozen):
    """A header the bundle adds to every request to `host`; the value is `template` with the secret in it."""

    host: Host
    header: str = Field(pattern=r"^[A-Za-z0-9-]+$")
    template: Annotated[str, AfterValidator(_template)] = "{secret}"
    secret: str  # the name of the secret in the bundle's secrets file, never the value


class BundleConfig(_Frozen):
    """/etc/bottle/config.json in the bundle."""

    format: Literal[1] = 1
    port: Annotated[int, Field(strict=True, gt=0, lt=65536)] = 8888
    dns_port: Annotated[int, Field(strict=True, gt=0, lt=65536)] = 53  # UDP and TCP, every query refused
    allow: list[Rule] = Field(default_factory=list)
    credentials: list[Credential] = Field(default_factory=list)
    refuse: list[IPNetwork] = Field(default_factory=list)  # the bottle's own subnet and gateway
    # Who may use the proxy (the agent's network); empty: whoever can reach it. Anyone else's connection
    # is closed before it is read, so no one but the agent gets a credential added.
    clients: list[IPNetwork] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ports_differ(self) -> BundleConfig:
        if self.dns_port == self.port:
            raise ValueError(f"dns_port and port are both {self.port}; DNS and the proxy need a port each")
        return self

    @classmethod
    def load(cls, path: Path) -> BundleConfig:
        """Load and validate; any problem is a ValueError with one line saying what is wrong."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"cannot read the bundle config {path}: {exc.strerror}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ValueError(f"invalid bundle config {path}: {where}: {first['msg']}") from None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the rule that allowed it, or why nothing did ("no rule", "refused address")
    reason: str  # one sentence for the 403 body and the audit log
    address: IPAddress | None = None  # where to connect: an address that was checked, never re-resolved
    intercept: bool = True


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


class Policy:
    """Decides requests against a BundleConfig; `resolver` is injectable so tests need no DNS."""

    def __init__(self, config: BundleConfig, resolver: Resolver = resolve):
        self.config = config
        self.resolver = resolver

    def rule_for(self, host: str) -> Rule | None:
        return next((r for r in self.config.allow if r.matches(host)), None)

    def lookup(self, host: str, port: int) -> list[IPAddress] | Exception:
        """The addresses `host` resolves to, or the error resolving it raised."""
        try:
            return self.resolver(host, port)
        except (OSError, ValueError) as exc:
            return exc

    def decide(self, host: str, port: int, found: list[IPAddress] | Exception | None = None) -> Decision:
        """Allow `host:port` only if a rule names it and every address it resolves to may be reached.

        `found` is what `lookup` returned for the host, if the caller already resolved it.
        """
        host = host.lower().rstrip(".")
        rule = self.rule_for(host)
        if rule is None:
            return Decision(False, "no rule", f"{host} is not on this bottle's egress allowlist")
        if port not in rule.ports:
            return Decision(False, rule.label, f"{host} is allowed on ports {rule.ports} only, not {port}")
        addresses = self.lookup(host, port) if found is None else found
        if isinstance(addresses, Exception):
            return Decision(False, rule.label, f"{host} does not resolve ({addresses})")
        if not addresses:
            return Decision(False, rule.label, f"{host} does not resolve")
        for address in addresses:
            refusal = self._refusal(address, rule)
            if refusal:
                return Decision(False, rule.label, f"{host} resolves to {address}, {refusal}")
        return Decision(True, rule.label, f"{host} is allowed by {rule.label}", addresses[0], rule.intercept)

    def _refusal(self, address: IPAddress, rule: Rule) -> str | None:
        for embedded in _embedded_ipv4(address):
            if refusal := self._refusal(embedded, rule):
                return f"which carries {embedded}, {refusal}"
        if any(address in n for n in NEVER if n.version == address.version):
            return "a loopback, link-local, reserved or metadata address the bundle never connects to"
        if any(address in n for n in self.config.refuse if n.version == address.version):
            return "the bottle's own network, which the bundle never connects to"
        if _embedded_ipv4(address):
            return None  # an IPv6 form of an IPv4 address that passed the checks above
        if address.is_reserved or address.is_multicast or address.is_loopback or address.is_link_local:
            return "a loopback, link-local, reserved or metadata address the bundle never connects to"
        if address.is_global or any(address in n for n in rule.cidrs if n.version == address.version):
            return None
        return "a private address this rule does not opt in (add it to the rule's cidrs to allow it)"

    def headers_for(self, host: str, secrets: dict[str, str]) -> dict[str, str]:
        """The headers to inject for `host` (exact match only), with the secrets filled in."""
        host = host.lower().rstrip(".")
        return {
            c.header: c.template.replace("{secret}", secrets[c.secret])
            for c in self.config.credentials
            if c.host == host
        }


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, compatible, translated, NAT64, 6to4, Teredo."""
    if address.version == 4:
        return []
    assert isinstance(address, ipaddress.IPv6Address)
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found = []
    if address.ipv4_mapped:
        found.append(address.ipv4_mapped)
    elif any(address in n for n in (_NAT64, _TRANSLATED)) or (address in _COMPATIBLE and int(address) > 1):
        found.append(low)
    if address.sixtofour:
        found.append(address.sixtofour)
    if address.teredo:
        found.extend(address.teredo)
    return found


_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,32}")  # a longer "name" is more likely a token


def _redact_parameters(text: str, separators: str) -> str:
    """`name=value` pairs with each value replaced; anything that is not such a pair is replaced whole."""
    parts = re.split(f"([{re.escape(separators)}])", text)
    out = []
    for part in parts:
        if len(part) == 1 and part in separators:
            out.append(part)
            continue
        name, sep, value = part.partition("=")
        # A name with no value, or only `=` after it, is most likely a bare token with base64 padding.
        named = sep and value.strip("=") and _NAME.fullmatch(name)
        out.append(f"{name}=REDACTED" if named else "REDACTED" if part else "")
    return "".join(out)


def redact_path(path: str) -> str:
    """The request path as the audit log shows it: path segments kept, every parameter value replaced.

    Query values, `;` path parameters and anything without a plain `name=` in front (a bare token, a
    percent-encoded `=`) become REDACTED, so tokens in URLs never reach the log; only names do.
    """
    path, _, _ = path.partition("#")
    base, sep, query = path.partition("?")
    base = re.sub("%3[dD]", "=", re.sub("%3[bB]", ";", base))  # an encoded parameter is still a parameter
    segments = [s.partition(";") for s in base.split("/")]  # a segment, then its `;` parameters
    base = "/".join(head + (sep and ";" + _redact_parameters(rest, ";")) for head, sep, rest in segments)
    return base + (("?" + _redact_parameters(query, "&;")) if sep else "")
