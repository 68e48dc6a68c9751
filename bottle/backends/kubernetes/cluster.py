"""The API server, through the official `kubernetes` client: six kinds of object, found by name or label.

Every failure becomes a BottleError with one sentence: the API server's own message for a refusal
(its `message` field), or that the server did not answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
import yaml
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from bottle.errors import BottleError, EnvironmentProblem

TIMEOUT = 15  # seconds any one API request may take


@dataclass(frozen=True)
class Kind:
    api: str  # the client's API class
    stem: str  # what its methods are named after: create_namespaced_<stem>, ...
    namespaced: bool = True


KINDS = {
    "Namespace": Kind("CoreV1Api", "namespace", namespaced=False),
    "NetworkPolicy": Kind("NetworkingV1Api", "network_policy"),
    "ConfigMap": Kind("CoreV1Api", "config_map"),
    "Secret": Kind("CoreV1Api", "secret"),
    "Service": Kind("CoreV1Api", "service"),
    "Pod": Kind("CoreV1Api", "pod"),
}


def kubeconfig_path() -> str:
    """$KUBECONFIG (a list of files, as kubectl takes it), else ~/.kube/config; read when asked, so a test's
    environment counts (the client reads $KUBECONFIG once, when it is imported)."""
    return os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def contexts() -> tuple[list[str], str | None]:
    """The kubeconfig's context names and its current one; none at all if there is no kubeconfig, and an
    EnvironmentProblem for one that cannot be read."""
    path = kubeconfig_path()
    try:
        found, current = kubernetes.config.list_kube_config_contexts(config_file=path)
        return [c["name"] for c in found], (current or {}).get("name")
    except (ConfigException, OSError, TypeError, ValueError, KeyError, AttributeError, yaml.YAMLError) as exc:
        if not any(Path(p).expanduser().exists() for p in path.split(os.pathsep)):
            return [], None
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EnvironmentProblem(f"the kubeconfig {path} cannot be used: {why}") from None


def _is_object(item: object) -> bool:
    """Whether an answer has what bottle reads of every object: metadata with a name and a uid."""
    meta = item.get("metadata") if isinstance(item, dict) else None
    return isinstance(meta, dict) and isinstance(meta.get("name"), str) and isinstance(meta.get("uid"), str)


def refusal(exc: ApiException) -> str:
    """The API server's reason for refusing a request, in its own words."""
    try:
        message = json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = exc.reason
    return f"{message} (HTTP {exc.status})"


class Cluster:
    """One kubeconfig context's API server."""

    def __init__(self, api_client: kubernetes.client.ApiClient, context: str):
        self.api_client = api_client
        self.context = context
        self.server = api_client.configuration.host
        self.core = kubernetes.client.CoreV1Api(api_client)

    @classmethod
    def connect(cls, context: str | None) -> Cluster:
        """The API server of `context` (None: the current one); no request is made yet."""
        names, current = contexts()
        wanted = context or current
        if wanted is None:
            raise EnvironmentProblem(
                f"no kubeconfig context to use ({kubeconfig_path()} has none); set KUBECONFIG or [kubernetes] context"
            )
        if wanted not in names:
            raise EnvironmentProblem(f"the kubeconfig {kubeconfig_path()} has no context '{wanted}'")
        configuration = kubernetes.client.Configuration()
        configuration.retries = False  # one sentence now beats three silent retries
        try:
            client = kubernetes.config.new_client_from_config(
                config_file=kubeconfig_path(), context=wanted, persist_config=False, client_configuration=configuration
            )
        except (ConfigException, OSError, TypeError, ValueError, AttributeError, yaml.YAMLError) as exc:
            raise EnvironmentProblem(f"kubeconfig context '{wanted}' cannot be used: {str(exc).splitlines()[0]}") from None
        return cls(client, wanted)

    def call(self, api: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request; a refusal or silence becomes a BottleError that says which."""
        target = getattr(getattr(kubernetes.client, api)(self.api_client), method)
        try:
            return target(*args, _request_timeout=TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status == 0 or exc.status is None:
                raise self.silent(exc) from None
            raise
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self.silent(exc) from None

    def silent(self, exc: Exception) -> EnvironmentProblem:
        return EnvironmentProblem(
            f"the Kubernetes API server at {self.server} (context '{self.context}') did not answer ({type(exc).__name__})"
        )

    def raw(self, api: str, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is returned as the server's JSON, not the client's models."""
        response = self.call(api, method, *args, _preload_content=False, **kwargs)
        try:
            answer = json.loads(response.data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BottleError(f"the Kubernetes API server at {self.server} answered with something that is not a "
                              "Kubernetes object")  # fmt: skip
        return answer

    def _method(self, kind: str, verb: str, namespace: str | None) -> tuple[str, str, tuple[str, ...]]:
        spec = KINDS[kind]
        if not spec.namespaced:
            return spec.api, f"{verb}_{spec.stem}", ()
        if verb == "list" and namespace is None:
            return spec.api, f"list_{spec.stem}_for_all_namespaces", ()
        return spec.api, f"{verb}_namespaced_{spec.stem}", (namespace or "",)

    def read(self, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
        api, method, ns = self._method(kind, "read", namespace)
        try:
            found = self.raw(api, method, name, *ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BottleError(f"cannot read {kind} {name}: {refusal(exc)}") from None
        if not _is_object(found):
            raise BottleError(f"the API server's {kind} {name} has no name or uid")
        return found

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        api, method, ns = self._method(kind, "create", meta.get("namespace"))
        try:
            return self.raw(api, method, *ns, obj)
        except ApiException as exc:
            raise BottleError(f"the API server refused {kind} {meta['name']}: {refusal(exc)}") from None

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        kind, meta = obj["kind"], obj["metadata"]
        api, method, ns = self._method(kind, "replace", meta.get("namespace"))
        try:
            return self.raw(api, method, meta["name"], *ns, obj)
        except ApiException as exc:
            raise BottleError(f"the API server refused to update {kind} {meta['name']}: {refusal(exc)}") from None

    def delete(self, kind: str, name: str, namespace: str | None, uid: str) -> bool:
        """Delete the object with this uid; False if it is gone (or that name is now another object's).
        Pods go at once: no grace for an agent."""
        api, method, ns = self._method(kind, "delete", namespace)
        grace = {"grace_period_seconds": 0} if kind == "Pod" else {}
        options = {"preconditions": {"uid": uid}} | grace
        try:
            self.call(api, method, name, *ns, body=options, _preload_content=False, **grace)
        except ApiException as exc:
            if exc.status in (404, 409):  # 409: the uid precondition failed
                return False
            where = f" in {namespace}" if namespace else ""
            raise BottleError(f"cannot delete {kind} {name}{where}: {refusal(exc)}") from None
        return True

    def list(self, kind: str, selector: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Objects of `kind` whose labels match `selector`, in `namespace` or (None) in every namespace."""
        api, method, ns = self._method(kind, "list", namespace)
        try:
            items = self.raw(api, method, *ns, label_selector=selector).get("items") or []
        except ApiException as exc:
            raise BottleError(f"cannot list {kind} objects: {refusal(exc)}") from None
        return [item for item in items if _is_object(item)]
