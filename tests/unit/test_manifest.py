from pathlib import Path

import pytest

from bottle.errors import ManifestError
from bottle.manifest import SLUG_MAX, load_manifest, parse_manifest, slugify

EXAMPLE = Path(__file__).parents[2] / "examples" / "claude-code.toml"


def minimal(**overrides):
    data = {"name": "demo", "agent": {"image": "debian:bookworm"}}
    data.update(overrides)
    return data


def error_of(data) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "b.toml")
    return str(info.value)


def test_the_shipped_example_is_a_valid_manifest():
    manifest = load_manifest(EXAMPLE)
    assert manifest.name == "claude-code"
    assert manifest.backend == "smolmachines"
    assert "api.anthropic.com" in [rule.host for rule in manifest.egress.allow]


def test_defaults_fill_what_a_minimal_manifest_leaves_out():
    manifest = parse_manifest(minimal())
    assert manifest.backend == "smolmachines"
    assert manifest.bundle.image == "bottle-bundle:latest"
    assert manifest.egress.allow == []
    assert manifest.agent.env == {}


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("claude-code", "claude-code"),
        ("My Claude Bottle", "my-claude-bottle"),
        ("../../etc/passwd", "etc-passwd"),
        ("  spaced   out  ", "spaced-out"),
        ("Ünïcode naïve", "n-code-na-ve"),
        ("a_b.c", "a-b-c"),
    ],
)
def test_slug_is_safe_for_docker_smolvm_and_paths(name, slug):
    assert slugify(name) == slug


def test_long_names_are_cut_with_a_hash_so_they_stay_distinct_and_stable():
    a, b = "x" * 60 + "a", "x" * 60 + "b"
    assert len(slugify(a)) == SLUG_MAX
    assert slugify(a) != slugify(b)
    assert slugify(a) == slugify(a)
    assert slugify(a).startswith("x" * 20)


def test_a_name_with_nothing_to_slug_is_refused():
    assert "b.toml: name: must contain at least one ASCII letter or digit" in error_of(minimal(name="!!!"))


def test_unknown_keys_are_named_with_the_keys_allowed_there():
    message = error_of(minimal(agent={"image": "x", "imagee": "y"}))
    assert message == "b.toml: agent.imagee: unknown key; allowed here: command, env, image"
    assert "b.toml: colour: unknown key; allowed here: agent, backend, bundle, docker, egress, kubernetes, name" == error_of(
        minimal(colour="red")
    )


def test_missing_and_mistyped_keys_say_what_is_expected():
    assert error_of({"name": "x"}) == "b.toml: agent: required key is missing"
    assert error_of(minimal(agent={"image": 3})) == "b.toml: agent.image: input should be a valid string"
    assert "b.toml: egress.allow: input should be a valid list" == error_of(minimal(egress={"allow": "x.com"}))


@pytest.mark.parametrize("key", ["HTTP_PROXY", "https_proxy", "No_Proxy", "ALL_PROXY", "NODE_EXTRA_CA_CERTS"])
def test_agent_env_cannot_override_what_bottle_sets(key):
    assert "is set by bottle itself" in error_of(minimal(agent={"image": "x", "env": {key: "http://evil:1"}}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ANTHROPIC_API_KEY", "x"),
        ("GITHUB_TOKEN", "x"),
        ("token", "x"),
        ("MY_SECRET_THING", "x"),
        ("DB_PASSWORD", "x"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        ("INNOCENT", "sk-ant-api03-abc"),
        ("INNOCENT", "ghp_abcdef"),
    ],
)
def test_agent_env_cannot_carry_credentials(key, value):
    message = error_of(minimal(agent={"image": "x", "env": {key: value}}))
    assert f"'{key}' looks like a credential" in message
    assert value not in message


@pytest.mark.parametrize("key", ["1X", "A-B", "A B", ""])
def test_agent_env_names_must_be_variable_names(key):
    assert "is not a valid variable name" in error_of(minimal(agent={"image": "x", "env": {key: "v"}}))


def test_agent_env_values_cannot_hold_nul():
    assert "NUL" in error_of(minimal(agent={"image": "x", "env": {"A": "a\0b"}}))


def test_agent_env_is_sorted():
    manifest = parse_manifest(minimal(agent={"image": "x", "env": {"B": "2", "A": "1"}}))
    assert list(manifest.agent.env) == ["A", "B"]


@pytest.mark.parametrize(
    ("rule", "host", "ports"),
    [
        ("example.com", "example.com", [443, 80]),
        ("*.example.com", "*.example.com", [443, 80]),
        ("api.example.com:8443", "api.example.com", [8443]),
        ("EXAMPLE.com", "example.com", [443, 80]),
        ({"host": "git.internal", "ports": [22]}, "git.internal", [22]),
    ],
)
def test_egress_rules_accept_hosts_wildcards_and_ports(rule, host, ports):
    [parsed] = parse_manifest(minimal(egress={"allow": [rule]})).egress.allow
    assert (parsed.host, parsed.ports) == (host, ports)


def test_egress_rules_can_opt_in_private_cidrs_and_skip_interception():
    rule = {"host": "git.internal", "cidrs": ["10.1.0.0/16"], "intercept": False}
    [parsed] = parse_manifest(minimal(egress={"allow": [rule]})).egress.allow
    assert (str(parsed.cidrs[0]), parsed.intercept) == ("10.1.0.0/16", False)
    assert "only private CIDRs can be opted in" in error_of(minimal(egress={"allow": [{"host": "x.com", "cidrs": ["8.8.8.0/24"]}]}))
    assert error_of(minimal(egress={"allow": [{"host": "x.com", "colour": 1}]})) == (
        "b.toml: egress.allow.0.colour: unknown key; allowed here: cidrs, host, intercept, ports"
    )


def credential(**overrides):
    return {"host": "api.example.com", "header": "x-api-key", "from_env": "EXAMPLE_KEY"} | overrides


def test_credentials_name_a_host_side_source_never_a_value():
    manifest = parse_manifest(minimal(egress={"allow": ["api.example.com"], "credentials": [credential()]}))
    assert manifest.egress.credentials[0].from_env == "EXAMPLE_KEY"
    assert "needs exactly one of from_env or from_file" in error_of(
        minimal(egress={"allow": ["api.example.com"], "credentials": [credential(from_file="/k")]})
    )
    assert "unknown key" in error_of(
        minimal(egress={"allow": ["api.example.com"], "credentials": [credential(value="sk-live")]})
    )


def test_a_credential_must_be_for_an_intercepted_allowed_host():
    for allow in (["other.example.com"], [{"host": "api.example.com", "intercept": False}]):
        message = error_of(minimal(egress={"allow": allow, "credentials": [credential()]}))
        assert "no allow rule with interception covers that host" in message


@pytest.mark.parametrize("rule", ["http://example.com", "exa mple.com", "*", "a.*.com", "x.com:0", "x.com:70000"])
def test_egress_rules_refuse_anything_else(rule):
    assert "egress.allow.0:" in error_of(minimal(egress={"allow": [rule]}))


def test_image_references_cannot_hold_spaces():
    assert "agent.image: must be an image reference" in error_of(minimal(agent={"image": "debian bookworm"}))


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ManifestError, match="nope.toml: no such file"):
        load_manifest(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\nagent = {\nimage = 1')
    with pytest.raises(ManifestError, match=r"broken.toml: not valid TOML: .*line 2"):
        load_manifest(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    with pytest.raises(ManifestError, match=r"^.*bad.toml: agent: required key is missing$"):
        load_manifest(bad)


@pytest.mark.parametrize(
    "user", ["0:0", "00:1000", "1000:0", "0000:00", "root", "1000", "node:node", "-1:5", "4294967296:1", "١٢:١٢", "²:1"]
)
def test_the_docker_user_is_a_numeric_uid_gid_and_never_root(user):
    assert "docker.user" in error_of(minimal(docker={"user": user}))


def test_docker_settings_have_sane_defaults_and_take_numbers():
    docker = parse_manifest(minimal(docker={"user": "1000:1000", "cpus": 1.5, "memory": "512m"})).docker
    assert (docker.user, docker.cpus, docker.memory, docker.pids, docker.runtime) == ("1000:1000", 1.5, "512m", 1024, None)
    assert parse_manifest(minimal()).docker.workspace is None
