"""The user's bottle.toml, validated with pydantic; `load_manifest` turns every problem into one sentence."""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bottle.bundle.policy import Rule
from bottle.errors import ManifestError

SLUG_MAX = 40
PLACEHOLDER = "bottle-placeholder-the-bundle-adds-the-real-key"

# Set by bottle itself in the agent's environment; a manifest may not override them.
RESERVED_ENV = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "NODE_EXTRA_CA_CERTS"})
# Names and values that look like credentials: those belong to the bundle, never to the VM.
CREDENTIAL_NAME_PATTERNS = (
    "*_API_KEY", "API_KEY", "*_TOKEN", "TOKEN", "*SECRET*", "*PASSWORD*", "*PASSWD*",
    "*CREDENTIAL*", "*PRIVATE_KEY*", "*ACCESS_KEY*",
)  # fmt: skip
CREDENTIAL_VALUE_PREFIXES = (
    "sk-", "ghp_", "gho_", "ghu_", "ghs_", "github_pat_", "glpat-", "xoxb-", "xoxp-", "AKIA", "-----BEGIN",
)  # fmt: skip

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RULE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*(?::(?P<port>[0-9]{{1,5}}))?")


_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def is_slug(text: object) -> bool:
    """Whether `text` is a slug as `slugify` makes them; anything read from outside is checked with this."""
    return isinstance(text, str) and len(text) <= SLUG_MAX and _SLUG.fullmatch(text) is not None


def slugify(name: str) -> str:
    """Derive the bottle's slug: lowercase `[a-z0-9-]`, at most SLUG_MAX characters, stable for a name.

    The slug names the docker network and container, the smolvm machine and the state directory, so it
    must be safe in all of them. A name that has to be cut keeps a hash of the whole name, so two long
    names that share a prefix still get different slugs.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError("must contain at least one ASCII letter or digit")
    if len(slug) > SLUG_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        slug = f"{slug[: SLUG_MAX - 9].rstrip('-')}-{digest}"
    return slug


def _check_name(name: str) -> str:
    if not name.strip() or len(name) > 200 or not name.isprintable():
        raise ValueError("must be 1 to 200 printable characters")
    slugify(name)
    return name


def _check_image(image: str) -> str:
    if not _IMAGE.fullmatch(image):
        raise ValueError("must be an image reference such as 'debian:bookworm' (no spaces)")
    return image


def _allow_rule(value: object) -> object:
    """`"host"`, `"*.suffix"` or either with `":port"`, as shorthand for a rule table."""
    if not isinstance(value, str):
        return value
    rule = value.lower()
    match = _HOST_RULE.fullmatch(rule)
    if not match:
        raise ValueError(f"'{value}' must be a host name, '*.suffix' wildcard, each with an optional ':port'")
    if match["port"] and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"'{value}' has a port outside 1-65535")
    host = rule.rsplit(":", 1)[0] if match["port"] else rule
    return {"host": host, "ports": [int(match["port"])]} if match["port"] else {"host": host}


def _is_credential_like(key: str, value: str) -> bool:
    upper = key.upper()
    return any(fnmatch.fnmatchcase(upper, p) for p in CREDENTIAL_NAME_PATTERNS) or value.startswith(
        CREDENTIAL_VALUE_PREFIXES
    )


Image = Annotated[str, AfterValidator(_check_image)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AgentConfig(_Strict):
    """`[agent]`: what runs inside the VM."""

    image: Image
    command: list[str] = Field(default_factory=lambda: ["/bin/sh"], min_length=1)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"'{key}' is not a valid variable name (letters, digits, '_')")
            if key.upper() in RESERVED_ENV or key.upper().startswith("BOTTLE_"):
                raise ValueError(f"'{key}' is set by bottle itself and cannot be overridden")
            if "\0" in value:
                raise ValueError(f"'{key}' contains a NUL character, which no environment can hold")
            if _is_credential_like(key, value):
                raise ValueError(
                    f"'{key}' looks like a credential; secrets never enter the VM, give them to the bundle"
                )
        return dict(sorted(env.items()))


class CredentialConfig(_Strict):
    """`[[egress.credentials]]`: a header the bundle adds for one host, its secret read on the host."""

    host: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    header: str = Field(pattern=r"^[A-Za-z0-9-]+$")
    template: str = "{secret}"
    from_env: str | None = None
    from_file: str | None = None
    # A variable set in the VM to PLACEHOLDER, for agents that refuse to start without a key of their
    # own (Claude Code and ANTHROPIC_API_KEY); the bundle replaces the header it produces.
    agent_placeholder: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _one_source(self) -> CredentialConfig:
        if (self.from_env is None) == (self.from_file is None):
            raise ValueError(f"credential for {self.host} needs exactly one of from_env or from_file")
        if "{secret}" not in self.template:
            raise ValueError(f"credential for {self.host}: template must contain {{secret}}")
        return self


class EgressConfig(_Strict):
    """`[egress]`: the hosts the bundle's proxy lets the agent reach, and the credentials it adds."""

    allow: list[Annotated[Rule, BeforeValidator(_allow_rule)]] = Field(default_factory=list)
    credentials: list[CredentialConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _credentials_need_an_intercepted_rule(self) -> EgressConfig:
        for credential in self.credentials:
            rule = next((r for r in self.allow if r.matches(credential.host)), None)
            if rule is None or not rule.intercept:
                raise ValueError(
                    f"credential for {credential.host}: no allow rule with interception covers that host, "
                    "so the bundle could never add the header"
                )
        return self


class BundleConfig(_Strict):
    """`[bundle]`: the sidecar container that runs the egress proxy."""

    image: Image = "bottle-bundle:latest"


class DockerConfig(_Strict):
    """`[docker]`: how the docker backend runs the agent's container (other backends ignore it)."""

    # An OCI runtime the Engine has registered, e.g. "runsc" (gVisor) or "kata-runtime"; None: the default.
    runtime: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    memory: str = Field(default="2g", pattern=r"^[1-9][0-9]*[kmg]?$")  # as `docker run --memory` takes it
    cpus: float = Field(default=2.0, gt=0, le=256)
    pids: int = Field(default=1024, ge=16, le=1_000_000)
    # A numeric "uid:gid" (a name could be root in the image's passwd); None: yours, or nobody's as root.
    user: str | None = Field(default=None, pattern=r"^[0-9]{1,10}:[0-9]{1,10}$")
    # A host directory mounted read-write at /workspace; None: /workspace is a tmpfs gone at `down`.
    workspace: str | None = None

    @field_validator("user")
    @classmethod
    def _not_root(cls, user: str | None) -> str | None:
        if user is not None and not all(0 < int(part) < 2**31 for part in user.split(":")):
            raise ValueError("must be a uid:gid from 1 to 2147483647, never root's 0; or leave it out")
        return user


def _matching(pattern: str, what: str) -> AfterValidator:
    """A string check whose error says what was expected, not which regex failed."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"'{value}' is not {what}")
        return value

    return AfterValidator(check)


_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
Quantity = Annotated[str, _matching(r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?",
                                    "a Kubernetes quantity such as '500m', '2' or '512Mi'")]
KubernetesName = Annotated[str, _matching(_DNS_LABEL, "a Kubernetes name (lowercase letters, digits and '-', at most 63)")]
ResourceName = Literal["cpu", "memory", "ephemeral-storage"]
# What the bundle may never reach in a cluster, unless `cluster_cidrs` says otherwise: the ranges pods,
# services and nodes are commonly numbered from. The bundle's policy refuses them, and its NetworkPolicy too.
DEFAULT_CLUSTER_CIDRS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"]


class KubernetesConfig(_Strict):
    """`[kubernetes]`: where and how the kubernetes backend runs the bottle (other backends ignore it)."""

    # A context of your kubeconfig ($KUBECONFIG or ~/.kube/config); None: its current context.
    context: str | None = Field(default=None, min_length=1, max_length=253)
    # None: a namespace of the bottle's own, `bottle-<slug>`, made and removed with it. A name: an existing
    # namespace the bottle's objects go into (bottle neither makes nor removes it).
    namespace: KubernetesName | None = None
    # A RuntimeClass for the agent's Pod (a gVisor or Kata one); None: the cluster's default runtime.
    runtime_class: KubernetesName | None = None
    # Run the agent's Pod in a user namespace of its own (hostUsers: false), so root in it, or an escape
    # from it, is nobody on the node. Needs Kubernetes 1.33+ (or the feature gate) and a runtime and kernel
    # that support it; a cluster without them does not start the Pod.
    user_namespaces: bool = False
    # The agent's numeric "uid:gid"; never root (the Pod also says runAsNonRoot).
    user: str = Field(default="65534:65534", pattern=r"^[0-9]{1,10}:[0-9]{1,10}$")
    requests: dict[ResourceName, Quantity] = Field(default_factory=lambda: {"cpu": "250m", "memory": "512Mi"})
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=lambda: {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "8Gi"}
    )
    # The cluster's own ranges (pods, services, nodes): the bundle never connects there.
    cluster_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in DEFAULT_CLUSTER_CIDRS]
    )

    @field_validator("user")
    @classmethod
    def _not_root(cls, user: str) -> str:
        return DockerConfig._not_root(user)

    @field_validator("cluster_cidrs", mode="before")
    @classmethod
    def _parse_cidrs(cls, value: object) -> object:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            try:
                return [ipaddress.ip_network(v) for v in value]
            except ValueError as exc:
                raise ValueError(f"{exc}: each entry must be a CIDR such as '10.0.0.0/8'") from None
        return value


class Manifest(_Strict):
    """A whole bottle.toml."""

    name: Annotated[str, AfterValidator(_check_name)]
    backend: str = "smolmachines"
    agent: AgentConfig
    egress: EgressConfig = Field(default_factory=EgressConfig)
    bundle: BundleConfig = Field(default_factory=BundleConfig)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @property
    def slug(self) -> str:
        return slugify(self.name)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds, looking through list[...] and Annotated[...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = Manifest
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; allowed here: {', '.join(_allowed_keys(loc))}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message[0].lower()}{message[1:]}"


def parse_manifest(data: dict[str, Any], source: str = "bottle.toml") -> Manifest:
    """Validate already-parsed TOML data; `source` names the file in every error."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError("\n".join(f"{source}: {_describe(e)}" for e in exc.errors())) from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate a bottle.toml."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file; pass -f PATH or start from examples/claude-code.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ManifestError(f"{path}: nested too deeply to be a bottle manifest") from None
    try:
        return parse_manifest(data, str(path))
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be a bottle manifest") from None
