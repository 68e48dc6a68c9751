"""A fake `smolvm` 0.8.0 executable, as strict as the real one about what bottle sends it.

smolvm cannot be installed where bottle's tests run, so this stands in for it. It honours the
contract in smolvm 0.8.0's sources: the subcommands and flags bottle uses (unknown flags and
conflicting flags are clap usage errors, exit 2), Smolfiles parsed with `deny_unknown_fields` at every
level and their types and CIDRs checked, and smolvm's "already exists" / "not found" errors (exit 1).
Machines are records in a state directory; nothing boots. Every call is appended to `calls.jsonl`.

Install it with `install(bin_dir, state_dir)`, which writes an executable `smolvm` into `bin_dir`.
Test controls, read from the environment of each call:
  SMOLVM_FAKE_FAIL=STEP    make that step fail as smolvm would (exit 1): one of STEPS
  SMOLVM_FAKE_HANG=STEP    write `<state>/hanging-STEP`, then sleep until killed (for signal tests)
  SMOLVM_FAKE_VERSION=X    what `--version` reports (default 0.8.0)
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

STATE_ENV = "SMOLVM_FAKE_STATE"
STEPS = ("pack", "machine-create", "machine-start", "machine-stop", "machine-delete", "machine-exec", "machine-ls")
ARTIFACT_MAGIC = "fake-smolmachine/1"

# The Smolfile schema of smolvm 0.8.0 (crates/smolvm-smolfile): field -> type, tables -> their fields.
_STR, _STRS, _INT, _BOOL = "string", "array of strings", "integer", "boolean"
_TABLES: dict[str, dict[str, str]] = {
    "": {
        "image": _STR, "entrypoint": _STRS, "cmd": _STRS, "env": _STRS, "workdir": _STR, "cpus": _INT,
        "memory": _INT, "net": _BOOL, "gpu": _BOOL, "gpu_vram": _INT, "storage": _INT, "overlay": _INT,
        "ports": _STRS, "volumes": _STRS, "init": _STRS,
    },
    "artifact": {"cpus": _INT, "memory": _INT, "entrypoint": _STRS, "cmd": _STRS, "oci_platform": _STR},
    "dev": {"volumes": _STRS, "env": _STRS, "init": _STRS, "workdir": _STR, "ports": _STRS},
    "network": {"allow_hosts": _STRS, "allow_cidrs": _STRS},
    "health": {"exec": _STRS, "interval": _STR, "timeout": _STR, "retries": _INT, "startup_grace": _STR},
    "restart": {"policy": _STR, "max_retries": _INT, "max_backoff": _STR},
    "auth": {"ssh_agent": _BOOL},
    "service": {"port": _INT, "protocol": _STR, "listen": _INT},
}  # fmt: skip
_TABLES["pack"] = _TABLES["artifact"]
_INT_RANGES = {"cpus": 2**8, "memory": 2**32, "gpu_vram": 2**32, "retries": 2**32, "max_retries": 2**32,
               "port": 2**16, "listen": 2**16}  # fmt: skip


class SmolvmError(Exception):
    """An error smolvm reports as `Error: ...` with exit code 1."""


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Write an executable `smolvm` into `bin_dir` that runs this fake with its state in `state_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "smolvm"
    script.write_text(
        f"#!/bin/sh\nexport {STATE_ENV}='{state_dir}'\nexec '{sys.executable}' -m bottle.testing.fake_smolvm \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def calls(state_dir: Path) -> list[list[str]]:
    """Every argv the fake received, in order."""
    path = state_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def machines(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The machines the fake holds, by name."""
    path = state_dir / "machines.json"
    return json.loads(path.read_text()) if path.exists() else {}


# -- parsing --------------------------------------------------------------------------------------------


class _ClapParser(argparse.ArgumentParser):
    """argparse that fails the way clap does: `error: ...` on stderr, exit 2, no prefix matching."""

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, add_help=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = f"unexpected argument '{message.split(': ', 1)[1].split()[0]}' found"
        sys.stderr.write(f"error: {message}\n\nUsage: {self.prog} [OPTIONS]\n\nFor more information, try '--help'.\n")
        raise SystemExit(2)


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid CIDR '{value}'") from None
    return value


def _env_pair(value: str) -> str:
    if "=" not in value or value.startswith("="):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{value}'")
    return value


def _parser() -> _ClapParser:
    root = _ClapParser(prog="smolvm")
    root.add_argument("--version", action="store_true")
    top = root.add_subparsers(dest="group", parser_class=_ClapParser)

    machine = top.add_parser("machine").add_subparsers(dest="command", parser_class=_ClapParser)
    create = machine.add_parser("create", prog="smolvm machine create")
    create.add_argument("name", nargs="?", default="default")
    create.add_argument("-I", "--image")
    create.add_argument("--cpus", type=int)
    create.add_argument("--mem", type=int)
    create.add_argument("-v", "--volume", action="append", default=[])
    create.add_argument("-p", "--port", action="append", default=[])
    create.add_argument("--net", action="store_true")
    create.add_argument("--allow-cidr", action="append", default=[], type=_cidr)
    create.add_argument("--allow-host", action="append", default=[])
    create.add_argument("--outbound-localhost-only", action="store_true")
    create.add_argument("--init", action="append", default=[])
    create.add_argument("-e", "--env", action="append", default=[], type=_env_pair)
    create.add_argument("-w", "--workdir")
    create.add_argument("--ssh-agent", action="store_true")
    create.add_argument("-s", "--smolfile")
    create.add_argument("--from", dest="from_")

    for name in ("start", "stop"):
        machine.add_parser(name, prog=f"smolvm machine {name}").add_argument("-n", "--name", default="default")
    delete = machine.add_parser("delete", prog="smolvm machine delete")
    delete.add_argument("name")
    delete.add_argument("-f", "--force", action="store_true")
    status = machine.add_parser("status", prog="smolvm machine status")
    status.add_argument("-n", "--name", default="default")
    status.add_argument("--json", action="store_true")
    for name in ("ls", "list"):
        ls = machine.add_parser(name, prog="smolvm machine ls")
        ls.add_argument("-v", "--verbose", action="store_true")
        ls.add_argument("--json", action="store_true")
    exec_ = machine.add_parser("exec", prog="smolvm machine exec")
    exec_.add_argument("-n", "--name", default="default")
    exec_.add_argument("-w", "--workdir")
    exec_.add_argument("-e", "--env", action="append", default=[], type=_env_pair)
    exec_.add_argument("--timeout")
    exec_.add_argument("-i", "--interactive", action="store_true")
    exec_.add_argument("-t", "--tty", action="store_true")
    exec_.add_argument("--stream", action="store_true")

    pack = top.add_parser("pack").add_subparsers(dest="command", parser_class=_ClapParser)
    pack_create = pack.add_parser("create", prog="smolvm pack create")
    pack_create.add_argument("-I", "--image")
    pack_create.add_argument("--from-vm")
    pack_create.add_argument("-o", "--output", required=True)
    pack_create.add_argument("--cpus", type=int)
    pack_create.add_argument("--mem", type=int)
    pack_create.add_argument("--oci-platform")
    pack_create.add_argument("--entrypoint")
    pack_create.add_argument("-s", "--smolfile")
    return root


def _conflict(parser_prog: str, first: str, second: str) -> NoReturn:
    sys.stderr.write(
        f"error: the argument '{first}' cannot be used with '{second}'\n\nUsage: {parser_prog} [OPTIONS]\n\n"
        "For more information, try '--help'.\n"
    )
    raise SystemExit(2)


# -- Smolfile -------------------------------------------------------------------------------------------


def _type_ok(kind: str, key: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == _BOOL:
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT_RANGES.get(key, 2**64)


def parse_smolfile(path: Path) -> dict[str, Any]:
    """Parse a Smolfile as smolvm 0.8.0 does: unknown keys and wrong types are hard errors."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SmolvmError(f"failed to read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SmolvmError(f"failed to parse {path}: {exc}") from None
    for table, fields in _TABLES.items():
        section = data if table == "" else data.get(table, {})
        if not isinstance(section, dict):
            raise SmolvmError(f"failed to parse {path}: invalid type for `{table}`, expected a table")
        for key, value in section.items():
            if table == "" and key in _TABLES:
                continue
            where = f"{table}.{key}" if table else key
            if key not in fields:
                expected = ", ".join(f"`{f}`" for f in fields)
                raise SmolvmError(f"failed to parse {path}: unknown field `{key}`, expected one of {expected}")
            if not _type_ok(fields[key], key, value):
                raise SmolvmError(f"failed to parse {path}: invalid type for `{where}`, expected {fields[key]}")
    for cidr in data.get("network", {}).get("allow_cidrs", []):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise SmolvmError(f"invalid CIDR '{cidr}' in {path}") from None
    for entry in data.get("env", []):
        _check_env(entry)
    return data


def _check_env(entry: str) -> None:
    if "=" not in entry or entry.startswith("="):
        raise SmolvmError(f"invalid environment variable '{entry}': expected KEY=VALUE")


# -- state ----------------------------------------------------------------------------------------------


class _State:
    def __init__(self, root: Path):
        self.root = root
        self.file = root / "machines.json"

    @contextmanager
    def machines(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The machine table, locked for the whole block and written back after it."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = json.loads(self.file.read_text()) if self.file.exists() else {}
            yield table
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
            os.replace(tmp, self.file)


def _find(table: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    if name not in table:
        raise SmolvmError(f"vm not found: {name}")
    return table[name]


# -- commands -------------------------------------------------------------------------------------------


def _create(args: argparse.Namespace, state: _State) -> int:
    if args.from_ and args.image:
        _conflict("smolvm machine create", "--from <FROM>", "--image <IMAGE>")
    if args.from_ and args.smolfile:
        _conflict("smolvm machine create", "--from <FROM>", "--smolfile <SMOLFILE>")
    env, cidrs, net, image = list(args.env), list(args.allow_cidr), args.net, args.image
    if args.smolfile:
        smolfile = parse_smolfile(Path(args.smolfile))
        env = smolfile.get("env", []) + env
        cidrs = smolfile.get("network", {}).get("allow_cidrs", []) + cidrs
        net = net or bool(smolfile.get("net"))
        image = image or smolfile.get("image")
    if args.from_:
        artifact = Path(args.from_)
        try:
            packed = json.loads(artifact.read_text())
        except (OSError, ValueError):
            raise SmolvmError(f"failed to load artifact {artifact}: not a .smolmachine file") from None
        if packed.get("magic") != ARTIFACT_MAGIC:
            raise SmolvmError(f"failed to load artifact {artifact}: not a .smolmachine file")
        image = packed["image"]
    if args.outbound_localhost_only:
        cidrs += ["127.0.0.0/8", "::1/128"]
    with state.machines() as table:
        if args.name in table:
            raise SmolvmError(
                f"a machine named '{args.name}' already exists. Use 'machine start --name {args.name}' to start "
                f"it, or 'machine delete {args.name} -f' to remove it."
            )
        table[args.name] = {
            "name": args.name,
            "state": "created",
            "image": image,
            "from": args.from_,
            "env": env,
            "allow_cidrs": cidrs,
            "allow_hosts": args.allow_host,
            "network": net or bool(cidrs) or bool(args.allow_host),
            "volumes": args.volume,
            "cpus": args.cpus or 1,
            "memory_mib": args.mem or 256,
            "pid": None,
            "created_at": int(time.time()),
        }
    print(f"Created machine '{args.name}'")
    return 0


def _set_state(name: str, state: _State, new: str) -> int:
    with state.machines() as table:
        machine = _find(table, name)
        machine["state"], machine["pid"] = new, (os.getpid() if new == "running" else None)
    print(f"Machine '{name}' {'started' if new == 'running' else 'stopped'}")
    return 0


def _delete(args: argparse.Namespace, state: _State) -> int:
    with state.machines() as table:
        machine = _find(table, args.name)
        if machine["state"] == "running" and not args.force:
            raise SmolvmError(f"invalid vm state: expected stopped, got running (use -f to delete '{args.name}')")
        del table[args.name]
    print(f"Deleted machine '{args.name}'")
    return 0


def _public(machine: dict[str, Any]) -> dict[str, Any]:
    """A machine as `machine ls --json` shows it."""
    return {
        "name": machine["name"],
        "state": machine["state"],
        "cpus": machine["cpus"],
        "memory_mib": machine["memory_mib"],
        "pid": machine["pid"],
        "mounts": len(machine["volumes"]),
        "ports": 0,
        "created_at": machine["created_at"],
        "storage_gb": None,
        "overlay_gb": None,
        "image": machine["image"],
        "entrypoint": [],
        "cmd": [],
        "ephemeral": False,
        "network": machine["network"],
    }


def _ls(args: argparse.Namespace, state: _State) -> int:
    with state.machines() as table:
        listed = [_public(m) for _, m in sorted(table.items())]
    if args.json:
        print(json.dumps(listed, indent=2))
    elif not listed:
        print("No machines found")
    else:
        for m in listed:
            print(f"{m['name']:<20} {m['state']:<12}")
    return 0


def _status(args: argparse.Namespace, state: _State) -> int:
    with state.machines() as table:
        machine = _find(table, args.name)
    if args.json:
        print(json.dumps(_public(machine), indent=2))
    else:
        print(f"Machine '{args.name}': {'running' if machine['state'] == 'running' else 'not running'}")
    return 0


def _exec(args: argparse.Namespace, command: list[str], state: _State) -> int:
    if not command:
        sys.stderr.write("error: the following required arguments were not provided:\n  <COMMAND>...\n")
        return 2
    with state.machines() as table:
        machine = _find(table, args.name)
    if machine["state"] != "running":
        raise SmolvmError(f"invalid vm state: expected running, got {machine['state']}")
    return 0


def _pack(args: argparse.Namespace, state: _State) -> int:
    if args.image and args.from_vm:
        _conflict("smolvm pack create", "--image <IMAGE>", "--from-vm <FROM_VM>")
    if not (args.image or args.from_vm):
        sys.stderr.write("error: one of '--image <IMAGE>' or '--from-vm <FROM_VM>' is required\n")
        return 2
    if args.smolfile:
        parse_smolfile(Path(args.smolfile))
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SmolvmError(f"io operation failed: no such directory: {output.parent}")
    print(f"Packing {args.image or args.from_vm} ...", file=sys.stderr)
    output.write_text(json.dumps({"magic": ARTIFACT_MAGIC, "image": args.image or args.from_vm}))
    print(f"Packed {output}")
    return 0


def _step(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    return "pack" if words[:1] == ["pack"] else "-".join(words[:2]).replace("machine-list", "machine-ls")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(os.environ[STATE_ENV])
    with open(root / "calls.jsonl", "a") as log:
        log.write(json.dumps(argv) + "\n")
    command: list[str] = []
    if "--" in argv:
        argv, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = _parser().parse_args(argv)
    if args.version:
        print(f"smolvm {os.environ.get('SMOLVM_FAKE_VERSION', '0.8.0')}")
        return 0
    step = _step(argv)
    if os.environ.get("SMOLVM_FAKE_HANG") == step:
        (root / f"hanging-{step}").write_text(str(os.getpid()))
        time.sleep(3600)
    state = _State(root)
    try:
        if os.environ.get("SMOLVM_FAKE_FAIL") == step:
            raise SmolvmError(f"{step} failed: injected by SMOLVM_FAKE_FAIL")
        if args.group == "pack" and args.command == "create":
            return _pack(args, state)
        if args.group == "machine":
            handlers = {
                "create": lambda: _create(args, state),
                "start": lambda: _set_state(args.name, state, "running"),
                "stop": lambda: _set_state(args.name, state, "stopped"),
                "delete": lambda: _delete(args, state),
                "status": lambda: _status(args, state),
                "ls": lambda: _ls(args, state),
                "list": lambda: _ls(args, state),
                "exec": lambda: _exec(args, command, state),
            }
            if args.command in handlers:
                return handlers[args.command]()
        sys.stderr.write("error: a subcommand is required\n\nUsage: smolvm <COMMAND>\n")
        return 2
    except SmolvmError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
