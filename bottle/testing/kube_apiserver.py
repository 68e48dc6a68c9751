"""A real Kubernetes API server on loopback for tests: etcd and kube-apiserver, nothing else.

`tests/support/kube-apiserver.sh` builds the server from Debian's source (cached after the first time).
There is no kubelet, scheduler or controller: Pods stay Pending unless a test plays the kubelet
(`play_kubelet`), a deleted Namespace stays Terminating, and a Service gets a ClusterIP but no endpoints.
What the API server itself does is real: validation, defaulting, RBAC, ClusterIP allocation, labels.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ADMIN, NOBODY = "bottle-test", "bottle-test-nobody"  # the kubeconfig's contexts: all rights, and none
SERVICE_RANGE = "10.96.0.0/16"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving_cert() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bottle-test-apiserver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class ApiServer:
    url: str
    kubeconfig: Path
    ca_pem: bytes
    processes: list[subprocess.Popen]
    directory: Path

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def build(script: Path) -> Path:
    """The kube-apiserver binary, built (or found in the cache) by `script`; RuntimeError if it cannot be."""
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"could not build kube-apiserver with {script}:\n{tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def start(binary: Path, directory: Path, timeout: float = 60) -> ApiServer:
    """etcd and kube-apiserver on free loopback ports, and a kubeconfig for them; RuntimeError if either
    does not come up."""
    directory.mkdir(parents=True, exist_ok=True)
    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    key_pem, cert_pem = _serving_cert()
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = {"serving.key": key_pem, "serving.crt": cert_pem, "sa.key": sa_key,
             "tokens.csv": b"admin-token,admin,1,system:masters\nnobody-token,nobody,2\n"}  # fmt: skip
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)
    log = open(directory / "log", "ab")
    processes = []
    server = ApiServer(f"https://127.0.0.1:{api_port}", directory / "kubeconfig", cert_pem, processes, directory)
    try:
        processes.append(subprocess.Popen([
            shutil.which("etcd") or "etcd", "--data-dir", str(directory / "etcd"), "--unsafe-no-fsync",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}", "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
        ], stdout=log, stderr=log))  # fmt: skip
        processes.append(subprocess.Popen([
            str(binary), f"--etcd-servers=http://127.0.0.1:{etcd_port}", "--bind-address=127.0.0.1",
            f"--secure-port={api_port}", "--insecure-port=0", "--advertise-address=10.0.0.1",
            f"--tls-cert-file={directory / 'serving.crt'}", f"--tls-private-key-file={directory / 'serving.key'}",
            f"--token-auth-file={directory / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={directory / 'sa.key'}",
            f"--service-account-signing-key-file={directory / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc", f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none",
        ], stdout=log, stderr=log))  # fmt: skip
        _write_kubeconfig(server)
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: ApiServer, timeout: float) -> None:
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    request = urllib.request.Request(f"{server.url}/readyz", headers={"Authorization": "Bearer admin-token"})
    deadline = time.monotonic() + timeout
    while True:
        for process in server.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {server.directory / 'log'}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"kube-apiserver was not ready within {timeout:.0f} s")
        time.sleep(0.3)


def _write_kubeconfig(server: ApiServer) -> None:
    import yaml

    ca = base64.b64encode(server.ca_pem).decode()
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": ADMIN,
        "clusters": [{"name": "bottle-test", "cluster": {"server": server.url, "certificate-authority-data": ca}}],
        "users": [{"name": "admin", "user": {"token": "admin-token"}}, {"name": "nobody", "user": {"token": "nobody-token"}}],
        "contexts": [{"name": ADMIN, "context": {"cluster": "bottle-test", "user": "admin"}},
                     {"name": NOBODY, "context": {"cluster": "bottle-test", "user": "nobody"}}],
    }  # fmt: skip
    server.kubeconfig.write_text(yaml.safe_dump(config))
    server.kubeconfig.chmod(0o600)


def play_kubelet(api: Any, namespace: str | None, stop: threading.Event, *, ready: bool = True) -> threading.Thread:
    """A thread that does, for every Pod in `namespace` (None: in every one), what a kubelet would report
    once it ran it: phase Running, an IP, and (with `ready`) every container ready. `api` is a kubernetes
    CoreV1Api."""

    def report() -> None:
        addresses = iter(range(2, 250))
        while not stop.is_set():
            try:
                pods = (api.list_namespaced_pod(namespace) if namespace else api.list_pod_for_all_namespaces()).items
            except Exception:  # the namespace may not exist yet
                pods = []
            for pod in pods:
                if pod.status.phase == "Running" or pod.metadata.deletion_timestamp:
                    continue
                status = "True" if ready else "False"
                body = {"status": {
                    "phase": "Running", "podIP": f"10.244.0.{next(addresses)}",
                    "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": status}],
                    "containerStatuses": [{"name": c.name, "image": c.image, "imageID": "", "ready": ready,
                                           "restartCount": 0, "state": {"running": {}}} for c in pod.spec.containers],
                }}  # fmt: skip
                try:
                    api.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, body)
                except Exception:
                    pass  # deleted meanwhile
            stop.wait(0.2)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    return thread
