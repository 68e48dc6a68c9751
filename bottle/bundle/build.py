"""`bottle bundle build`: the bundle image, built without network access inside the build."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker

from bottle.errors import EnvironmentProblem

PACKAGE = Path(__file__).resolve().parents[1]  # the bottle package directory
REQUIREMENTS = ["mitmproxy>=11,<12", "pydantic>=2.6,<3", "uvloop>=0.19,<1"]
DEFAULT_BASE = "python:3.11-slim"
DEFAULT_TAG = "bottle-bundle:latest"


def _platforms(machine: str) -> list[str]:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{minor}_{arch}" for minor in range(17, 37)]


def _pip(step: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentProblem(f"could not {step}: {last}")


def download_wheels(dest: Path, python: str) -> None:
    """Wheels of the bundle's dependencies for Linux and `python` (e.g. "3.11"), so the build is offline.

    Dependencies published only as source (pyperclip, for one) are built into wheels here first;
    pip then fetches binary wheels for the image's platform and finds those among them.
    """
    sources = dest.parent / "sources"
    _pip("resolve the bundle's dependencies", ["download", "--quiet", "--dest", str(sources), *REQUIREMENTS])
    for sdist in [*sources.glob("*.tar.gz"), *sources.glob("*.zip")]:
        _pip(f"build a wheel of {sdist.name}", ["wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(sdist)])
    args = ["download", "--quiet", "--dest", str(dest), "--find-links", str(dest), "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp"]  # fmt: skip
    for tag in _platforms(platform.machine()):
        args += ["--platform", tag]
    _pip(f"download the bundle's wheels for Python {python}", [*args, *REQUIREMENTS])


def build(
    client: docker.DockerClient,
    *,
    base: str = DEFAULT_BASE,
    tag: str = DEFAULT_TAG,
    python: str = "3.11",
    progress: Callable[[str], None] = lambda line: None,
) -> str:
    """Build the bundle image from `base` (which must have `python` with venv); return its ID."""
    with tempfile.TemporaryDirectory(prefix="bottle-bundle-build-") as tmp:
        context = Path(tmp)
        progress(f"downloading wheels for Python {python}")
        download_wheels(context / "wheels", python)
        shutil.copytree(PACKAGE, context / "src" / "bottle", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(PACKAGE / "bundle" / "Dockerfile", context / "Dockerfile")
        progress(f"building {tag} from {base}")
        try:
            image, _ = client.images.build(
                path=str(context), tag=tag, buildargs={"BASE": base}, rm=True, labels={"bottle.role": "bundle"}
            )
        except docker.errors.BuildError as exc:
            said = [str(e.get("stream") or e.get("error") or "").strip() for e in exc.build_log]
            tail = " | ".join(line for line in said if line)[-400:]
            raise EnvironmentProblem(f"building the bundle image failed: {exc.msg} ({tail})") from None
    return image.id
