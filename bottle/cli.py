"""The `bottle` command: the composition root, and the only place that builds real clients."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import docker
import requests
import yaml
from kubernetes.client.rest import ApiException

from bottle import registry
from bottle.backend import Backend, BottleStatus, PreflightReport
from bottle.backends.kubernetes.cluster import refusal
from bottle.bundle import build as bundle_build
from bottle.errors import BottleError, Busy, EnvironmentProblem, PreflightFailed, UsageError
from bottle.manifest import Manifest, load_manifest, slugify
from bottle.plan import BottlePlan
from bottle.sidecar import bundle_log
from bottle.state import PLAN_FILE, StateStore

manifest_option = click.option(
    "-f", "--file", "manifest_path", type=click.Path(path_type=Path), default=Path("bottle.toml"),
    show_default=True, help="The bottle's manifest.",
)  # fmt: skip
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def docker_client() -> docker.DockerClient:
    """Connect to the Docker Engine named by the environment (DOCKER_HOST, or the local socket)."""
    try:
        return docker.from_env()
    except docker.errors.DockerException as exc:
        raise EnvironmentProblem(
            f"no Docker Engine is reachable ({exc}); start it, or point DOCKER_HOST at it"
        ) from None


def optional_docker_client() -> docker.DockerClient | None:
    try:
        return docker_client()
    except EnvironmentProblem:
        return None


def _load(manifest_path: Path) -> tuple[Manifest, Backend, docker.DockerClient, PreflightReport]:
    """The manifest, its backend, a Docker client (None for a backend that needs none), and the backend's
    preflight report."""
    manifest = load_manifest(manifest_path)
    backend = registry.load(manifest.backend)()
    client = docker_client() if backend.needs_docker else None
    return manifest, backend, client, backend.preflight(docker=client, manifest=manifest)


def _backends(client: docker.DockerClient | None) -> tuple[list[Backend], list[str]]:
    """The installed backends that can be asked here (those that need the Docker Engine only if it
    answers), and a sentence for the ones that cannot."""
    backends = [registry.load(name)() for name in registry.available()]
    skipped = [b.name for b in backends if client is None and b.needs_docker]
    problems = [f"{' and '.join(skipped)} bottles not looked at: no Docker Engine is reachable (start it, or point "
                "DOCKER_HOST at it)"] if skipped else []  # fmt: skip
    return [b for b in backends if b.name not in skipped], problems


def _ready(backend: Backend, report: PreflightReport) -> None:
    if not report.ok:
        raise PreflightFailed(backend.name, report.problems)


def _echo_plan(plan: BottlePlan, as_json: bool) -> None:
    if as_json:
        click.echo(plan.model_dump_json(indent=2))
        return
    data: dict[str, Any] = plan.model_dump(mode="json")
    width = max(map(len, data))
    for key, value in data.items():
        if isinstance(value, dict):
            click.echo(f"{key:<{width}}")
            for k, v in value.items():
                click.echo(f"  {k}={v}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            click.echo(f"{key:<{width}}  {len(value)} (`bottle plan --yaml` shows them)")
        else:
            shown = "-" if value is None else " ".join(value) if isinstance(value, list) else value
            click.echo(f"{key:<{width}}  {shown}")


def _echo_objects(plan: BottlePlan) -> None:
    objects = getattr(plan, "objects", None)
    if objects is None:
        raise UsageError(f"backend '{plan.backend}' makes no Kubernetes objects; `bottle plan --json` shows its plan")
    click.echo(f"# bottle '{plan.name}': the objects `bottle up` applies, in order. Values read from a host file at\n"
               "# `up` (the bundle's config, CA and credentials) are shown as the file's path, never as the value.")
    click.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


def _echo_report(report: PreflightReport) -> None:
    click.echo(f"{report.backend}:")
    for check in report.checks:
        mark = "ok  " if check.ok else "FAIL"
        click.echo(f"  {mark} {check.name}: {check.detail}")
        if not check.ok and check.fix:
            click.echo(f"       fix: {check.fix}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="bottle")
def cli(debug: bool) -> None:
    """Run an AI coding agent in a microVM whose only way out is an audited egress proxy."""


@cli.command()
@manifest_option
@json_option
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the objects the plan applies, as YAML documents "
              "(backends that run bottles as Kubernetes objects).")  # fmt: skip
def plan(manifest_path: Path, as_json: bool, as_yaml: bool) -> None:
    """Show the plan `prepare` would make, without creating anything."""
    manifest, backend, client, report = _load(manifest_path)
    result = backend.plan(manifest, docker=client, state=StateStore(), preflight=report)
    if as_yaml:
        _echo_objects(result)
    else:
        _echo_plan(result, as_json)
    if not report.ok:
        click.echo("note: this machine is not ready to run it yet; `bottle doctor` says why", err=True)


@cli.command()
@manifest_option
@json_option
def prepare(manifest_path: Path, as_json: bool) -> None:
    """Check this machine, create the bottle's network and Smolfile, and save its plan."""
    manifest, backend, client, report = _load(manifest_path)
    _ready(backend, report)
    state = StateStore()
    with _terminate_as_interrupt(), state.lock(manifest.slug, on_wait=_waiting(manifest.slug)):
        result = backend.prepare(manifest, docker=client, state=state, preflight=report)
    _echo_plan(result, as_json)
    click.echo(f"plan saved to {state.bottle_dir(manifest.slug) / PLAN_FILE}", err=True)


def _waiting(slug: str) -> Callable[[], None]:
    return lambda: click.echo(f"waiting for another bottle command working on '{slug}'", err=True)


def _progress(step: str, detail: str) -> None:
    click.echo(f"  {step:<14} {detail}", err=True)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while bottle changes things, so either one leaves nothing half-made."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@cli.command()
@manifest_option
@click.option("-d", "--detach", is_flag=True, help="Leave the bottle running without attaching to the agent.")
def up(manifest_path: Path, detach: bool) -> None:
    """Start the bottle (bundle, then VM) and attach to the agent; attach if it is already up."""
    manifest, backend, client, report = _load(manifest_path)
    _ready(backend, report)
    state = StateStore()
    click.echo(f"bottle '{manifest.name}' ({backend.name}):", err=True)
    with _terminate_as_interrupt(), state.lock(manifest.slug, on_wait=_waiting(manifest.slug)):
        plan = backend.up(manifest, docker=client, state=state, preflight=report, on_step=_progress)
    if detach:
        click.echo(f"bottle '{manifest.name}' is up; `bottle up -f {manifest_path}` attaches to it, "
                   f"`bottle down {manifest.slug}` removes it", err=True)
        return
    raise click.exceptions.Exit(backend.attach(plan, tty=sys.stdin.isatty()))


@cli.command()
@click.argument("name")
def down(name: str) -> None:
    """Remove the bottle NAME: its VM, bundle, network and state (the image cache stays)."""
    slug = _slug_of(name)
    client = optional_docker_client()
    state = StateStore()
    removed: list[str] = []
    failed: list[str] = []
    with _terminate_as_interrupt(), state.lock(slug):
        backends, skipped = _backends(client)
        for backend in backends:  # every backend, even when one of them fails
            try:
                removed += backend.down(slug, docker=client, state=state)
            except BottleError as exc:
                failed.append(str(exc))
    for thing in removed:
        click.echo(f"removed {thing}")
    if failed or (skipped and not removed):  # what was not looked at may hold the bottle
        raise BottleError("; ".join(failed + skipped))
    for note in skipped:
        click.echo(f"note: {note}", err=True)
    if not removed:
        click.echo(f"bottle '{slug}': nothing to remove")


def _slug_of(name: str) -> str:
    try:
        return slugify(name)
    except ValueError as exc:
        raise UsageError(f"'{name}' is not a bottle name: it {exc}") from None


def _inventory(client: docker.DockerClient | None, state: StateStore) -> tuple[list[BottleStatus], list[str]]:
    """Every backend's bottles, and a sentence for each backend that could not look (no Docker Engine, a
    cluster that does not answer): the others' bottles are listed all the same."""
    found: list[BottleStatus] = []
    backends, problems = _backends(client)
    for backend in backends:
        try:
            found += backend.inventory(docker=client, state=state)
        except BottleError as exc:
            problems.append(f"{backend.name} bottles not looked at: {exc}")
    return found, problems


@cli.command(name="ls")
@json_option
def ls_command(as_json: bool) -> None:
    """List every bottle on this machine, its parts, and anything that does not add up."""
    statuses, problems = _inventory(optional_docker_client(), StateStore())
    _list(statuses, as_json)
    if problems:  # a partial list is not the answer: say what is missing from it, and exit 1
        raise EnvironmentProblem("; ".join(problems))


def _list(statuses: list[BottleStatus], as_json: bool) -> None:
    if as_json:
        rows = [s.model_dump() | {"state": s.state} for s in statuses]
        click.echo(json.dumps(rows, indent=2))
        return
    if not statuses:
        click.echo("no bottles")
        return
    part_names = sorted({p for s in statuses for p in s.parts})
    header = ["NAME", "STATE", "BACKEND", "ADDRESS", *(p.upper() for p in part_names)]
    rows = [
        [s.name or f"({s.slug})", s.state, s.backend, s.address or "-", *(s.parts.get(p, "-") for p in part_names)]
        for s in statuses
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row, status in zip([header, *rows], [None, *statuses]):
        click.echo(_printable("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()))
        for note in status.drift if status else []:
            click.echo(_printable(f"  ! {note}"))


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
def gc(dry_run: bool) -> None:
    """Remove leftovers: bottle resources and VMs that belong to no bottle on disk."""
    client = optional_docker_client()
    state = StateStore()
    found, problems = _inventory(client, state)
    for stray in (s for s in found if s.foreign):
        click.echo(_printable(f"left alone: {stray.drift[0]}"), err=True)
    orphans = [s for s in found if s.orphan]
    failed = []
    for orphan in orphans:
        parts = ", ".join(f"{k} {v}" for k, v in orphan.parts.items() if v != "missing")
        if dry_run:
            click.echo(f"would remove {orphan.slug} ({orphan.backend}): {parts}")
            continue
        try:
            with state.lock(orphan.slug, timeout=0):
                if state.read_plan_data(orphan.slug) is not None:
                    continue  # an `up` saved its plan since we looked: no longer an orphan
                removed = registry.load(orphan.backend)().down(orphan.slug, docker=client, state=state)
        except Busy as exc:
            click.echo(f"skipped {orphan.slug}: {exc}", err=True)
            continue
        except BottleError as exc:
            failed.append(orphan.slug)
            click.echo(f"skipped {orphan.slug}: {exc}", err=True)
            continue
        for thing in removed:
            click.echo(f"removed {thing}")
    if not orphans:
        click.echo("nothing to collect")
    if failed:
        raise BottleError(f"could not collect {', '.join(failed)}; the lines above say why")
    if problems:
        raise EnvironmentProblem("; ".join(problems))


def _printable(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, control characters)
    shown as an escape instead: audit fields come from the agent, which must not draw on your terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _format_audit(entry: dict[str, Any]) -> str:
    return _printable(_audit_line(entry))


def _audit_line(entry: dict[str, Any]) -> str:
    if entry.get("event") == "client":
        return f"{entry.get('time')}  {str(entry.get('decision')).upper():<5}  CLIENT {entry.get('client')}  {entry.get('reason')}"
    if entry.get("event") == "dns":
        what = entry.get("name") or entry.get("reason")
        kind = f" (type {entry['qtype']})" if entry.get("qtype") is not None else ""
        return f"{entry.get('time')}  {str(entry.get('decision')).upper():<5}  DNS {what}{kind}  from {entry.get('client')}"
    where = f"{entry.get('host')}:{entry.get('port')}{entry.get('path') or ''}"
    decision = str(entry.get("decision", "?")).upper()
    tail = entry.get("reason") or f"{entry.get('status')}  out {entry.get('bytes_out')} B  in {entry.get('bytes_in')} B"
    return f"{entry.get('time')}  {decision:<5}  {entry.get('method')} {where}  {tail}"


@cli.command()
@click.argument("name")
@click.option("--denied", is_flag=True, help="Only requests the bundle refused.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries as they come.")
@json_option
def logs(name: str, denied: bool, follow: bool, as_json: bool) -> None:
    """Show the bundle's audit log for bottle NAME: one line per request, allowed or refused."""
    slug = _slug_of(name)
    state = StateStore()
    made_by = (state.read_plan_data(slug) or {}).get("backend")
    backend = registry.load(made_by)() if made_by in registry.available() else None
    if backend is not None and not backend.needs_docker:
        output = backend.bundle_log(slug, docker=None, state=state, follow=follow)
    else:  # a docker container, whichever backend made it (even one whose plan is gone)
        output = bundle_log(docker_client(), state, slug, follow=follow)
    pending = b""
    for chunk in output:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not an audit entry
            if denied and entry.get("decision") not in ("deny", "refused", "dropped"):
                continue
            click.echo(line.decode() if as_json else _format_audit(entry))


@cli.group()
def bundle() -> None:
    """The bundle image: the egress proxy every bottle runs beside its VM."""


@bundle.command(name="build")
@click.option("--base", default=bundle_build.DEFAULT_BASE, show_default=True,
              help="Base image with Python and venv (a local one works offline).")
@click.option("--tag", default=bundle_build.DEFAULT_TAG, show_default=True, help="Tag for the built image.")
@click.option("--python", "python_version", default="3.11", show_default=True, help="The base image's Python.")
def bundle_build_command(base: str, tag: str, python_version: str) -> None:
    """Build the bundle image (downloads wheels on this host, so the build itself needs no network)."""
    image_id = bundle_build.build(
        docker_client(), base=base, tag=tag, python=python_version, progress=lambda line: click.echo(line, err=True)
    )
    click.echo(f"{tag} {image_id}")


@cli.command()
def backends() -> None:
    """List the installed backends."""
    for name, ep in registry.available().items():
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
        click.echo(f"{name}  {ep.value}  ({dist})")


@cli.command()
@click.argument("backend_names", metavar="[BACKEND]...", nargs=-1)
@click.option("-f", "--file", "manifest_path", type=click.Path(path_type=Path),
              help="Check for this manifest's bottle: its backend, with its settings.")  # fmt: skip
def doctor(backend_names: tuple[str, ...], manifest_path: Path | None) -> None:
    """Check this machine for the named backends (default: every installed one); exit 1 if anything is missing."""
    manifest = load_manifest(manifest_path) if manifest_path else None
    names = [manifest.backend] if manifest else list(backend_names or registry.available())
    client = optional_docker_client()
    ready = True
    for name in names:
        report = registry.load(name)().preflight(docker=client, manifest=manifest)
        _echo_report(report)
        ready &= report.ok
    if not ready:
        raise click.exceptions.Exit(1)


def _sentence(exc: Exception) -> tuple[str, int]:
    """The one line and exit code an error ends `bottle` with."""
    if isinstance(exc, BottleError):
        return str(exc), exc.exit_code
    if isinstance(exc, docker.errors.DockerException):
        return f"the Docker Engine failed a request: {exc}", 1
    if isinstance(exc, ApiException):
        return f"the Kubernetes API server refused a request: {refusal(exc)}", 1
    if isinstance(exc, requests.exceptions.RequestException):
        return f"the Docker Engine stopped answering ({type(exc).__name__}); is it running?", 1
    if isinstance(exc, OSError):
        return f"cannot use {exc.filename or 'a file'}: {exc.strerror or exc}", 1
    return f"internal error: {exc!r} (run with --debug for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn every error into one line on stderr and an exit code (0 ok, 1 environment, 2 input)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # Without standalone mode click returns the code of `Exit` (e.g. --help, --version, doctor's 1).
        code = cli.main(args=args, prog_name="bottle", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("bottle: interrupted", err=True)
        return 130
    except Exception as exc:
        if "--debug" in args:
            traceback.print_exc()
        message, exit_code = _sentence(exc)
        # What a server or a file said can hold escape sequences: never let them act on the terminal.
        click.echo("\n".join(_printable(line) for line in f"bottle: {message}".split("\n")), err=True)
        return exit_code
    return code if isinstance(code, int) else 0
