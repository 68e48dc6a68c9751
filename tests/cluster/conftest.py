"""tests/cluster runs against a real Kubernetes cluster, never by default (pyproject's testpaths leave it
out): `BOTTLE_TEST_KUBECONTEXT=<context> BOTTLE_TEST_BUNDLE_IMAGE=<image> .venv/bin/pytest tests/cluster`.

Without those variables it fails, so that it is never counted as run when it was not.
"""

import os

import pytest


@pytest.fixture(scope="session")
def cluster_settings() -> dict[str, str]:
    context = os.environ.get("BOTTLE_TEST_KUBECONTEXT")
    image = os.environ.get("BOTTLE_TEST_BUNDLE_IMAGE")
    if not context or not image:
        pytest.fail("tests/cluster needs a real cluster: set BOTTLE_TEST_KUBECONTEXT to a kubeconfig context and "
                    "BOTTLE_TEST_BUNDLE_IMAGE to a bottle bundle image that cluster can pull")  # fmt: skip
    return {
        "context": context,
        "bundle_image": image,
        # Any image with python3 and `sleep`, pullable by the cluster.
        "agent_image": os.environ.get("BOTTLE_TEST_AGENT_IMAGE", "python:3.12-slim"),
        "kubeconfig": os.environ.get("KUBECONFIG", os.path.expanduser("~/.kube/config")),
    }


@pytest.fixture(autouse=True)
def _their_kubeconfig(cluster_settings, monkeypatch):
    """tests/conftest.py hides the user's kubeconfig from every test; these tests are run for it."""
    monkeypatch.setenv("KUBECONFIG", cluster_settings["kubeconfig"])
