"""The bundle refuses to start on any bad input, with one line on stderr, before it listens."""

import json
import subprocess
import sys

import pytest

from bottle.bundle.ca import create_ca
from bottle.bundle.policy import BundleConfig, Credential, Rule

CONFIG = BundleConfig(
    allow=[Rule(host="api.example.com")],
    credentials=[Credential(host="api.example.com", header="x-api-key", secret="credential-0")],
)


def start(tmp_path, *, config=None, secrets=None, ca=None):
    """Run the bundle's entry point on a bundle directory made of these parts; return (exit code, stderr)."""
    (tmp_path / "ca").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(config if config is not None else CONFIG.model_dump_json())
    (tmp_path / "secrets.json").write_text(secrets if secrets is not None else '{"credential-0": "sk-x"}')
    key, cert = create_ca("test")
    (tmp_path / "ca" / "mitmproxy-ca.pem").write_bytes(ca if ca is not None else key + cert)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from bottle.bundle.__main__ import main; sys.exit(main())"],
        env={"BOTTLE_BUNDLE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return result.returncode, result.stderr


@pytest.mark.parametrize(
    ("secrets", "why"),
    [
        ('{"credential-0": null}', "not non-empty strings"),
        ('{"credential-0": ""}', "not non-empty strings"),
        ('{"credential-0": 12345}', "not non-empty strings"),
        ('{"credential-0": "sk-x\\r\\nX-Injected: 1"}', "free of control characters"),
        ('{"credential-0": "sk-x\\n"}', "free of control characters"),
        ('["sk-x"]', "is not a JSON object"),
        ("{}", "has no value for credential-0"),
        ("not json", "cannot read the bundle's secrets"),
    ],
)
def test_bad_secrets_stop_the_bundle_with_one_line(tmp_path, secrets, why):
    code, err = start(tmp_path, secrets=secrets)
    assert code == 2 and why in err and err.count("\n") == 1 and "Traceback" not in err
    assert "sk-x" not in err  # the refusal names the secret, never its value


@pytest.mark.parametrize("port", [0, 65536, 70000, -1, True, "9999", 8888.0])
def test_a_port_out_of_range_stops_the_bundle(tmp_path, port):
    code, err = start(tmp_path, config=json.dumps(json.loads(CONFIG.model_dump_json()) | {"port": port}))
    assert code == 2 and "port" in err and err.count("\n") == 1


BAD_CERT = b"-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHHIG\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("ca", [b"", BAD_CERT, create_ca("only the cert")[1], create_ca("a")[0] + create_ca("b")[1],
                                b"".join(create_ca("c")) + BAD_CERT])  # fmt: skip
def test_a_ca_that_does_not_parse_or_match_stops_the_bundle(tmp_path, ca):
    code, err = start(tmp_path, ca=ca)
    assert code == 2 and "the bundle's CA" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_port_in_use_stops_the_bundle_with_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = start(tmp_path, config=json.dumps(json.loads(CONFIG.model_dump_json()) | {"port": port}))
    assert code == 2 and f"cannot listen on :{port}" in err and err.count("\n") == 1
