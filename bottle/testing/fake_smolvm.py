"""A `smolvm` for machines that cannot boot a VM: the real binary, with only the boot simulated.

Every command the real smolvm answers without a boot (`--version`, `machine create`, `ls`, `status`,
`delete`, and every argument, Smolfile and error check, `exec`'s included) goes to the real binary,
with its state in the fake's own directory. Only what needs a booted VM is simulated:
- `machine start` runs a stand-in container (`vm_image`) on the docker network that holds the
  machine's allowed CIDR, with the Smolfile's volumes mounted, resolving through the machine's `dns`,
  and confines its network to what the real smolvm recorded: outbound traffic only to `allowed_cidrs`
  (iptables in the container's network namespace, so this needs root), everything else rejected, no
  IPv6;
- `machine exec` runs the command in that container, with the Smolfile's env; its exit code is the
  command's; `machine stop` and `delete` remove the container.
`ls`/`status` report a machine with a running stand-in as `running`. So the fake's claims about what
the VM can reach are the real binary's allowlist, enforced by the kernel; see tests/integration/
test_smolvm_parity.py for the calls compared against the real binary alone.

Test controls, set with `control(state_dir, ...)` (bottle does not pass test variables to smolvm):
  fail=STEP    make that step fail as smolvm would (exit 1, SMOLVM_ERROR): one of STEPS
  hang=STEP    write `<state>/hanging-STEP`, then sleep until killed (for signal tests)
  net="open"   do not confine the stand-in: a VM whose allowlist is not enforced
  net="udp"    confine its TCP only: a VM whose allowlist leaks datagrams
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
import zlib
from pathlib import Path
from typing import Any

STATE_ENV = "SMOLVM_FAKE_STATE"
STEPS = ("machine-create", "machine-start", "machine-stop", "machine-delete", "machine-exec", "machine-ls")
CONTAINER_PREFIX = "smolvm-fake-"


def install(bin_dir: Path, state_dir: Path, real: Any, vm_image: str) -> Path:
    """Write an executable `smolvm` into `bin_dir`: this fake, in front of the real `Smolvm` `real`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "config.json").write_text(
        json.dumps({"real": real.executable, "env": real.env, "vm_image": vm_image})
    )
    script = bin_dir / "smolvm"
    script.write_text(
        f"#!/bin/sh\nexport {STATE_ENV}={shlex.quote(str(state_dir))}\n"
        f"exec {shlex.quote(sys.executable)} -m bottle.testing.fake_smolvm \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def calls(state_dir: Path) -> list[list[str]]:
    """Every argv the fake received, in order."""
    path = state_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def control(state_dir: Path, **settings: str | None) -> None:
    """Set (or, with None, clear) the test controls: fail, hang, net."""
    path = state_dir / "control.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({k: v for k, v in (current | settings).items() if v is not None}))


def cleanup(state_dir: Path) -> None:
    """Remove the stand-ins of every machine the fake holds (the real state goes with the directory)."""
    fake = _Fake(state_dir)
    for name in machines(state_dir):
        fake.remove(name)


def machines(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The machines the fake holds, by name, as its `machine ls --json` shows them."""
    fake = _Fake(state_dir)
    result = fake.real_run(["machine", "ls", "--json"])
    return {m["name"]: m for m in fake.patched(json.loads(result.stdout))}


class _Fake:
    def __init__(self, root: Path):
        self.root = root
        config = json.loads((root / "config.json").read_text())
        self.real, self.real_env, self.vm_image = config["real"], config["env"], config["vm_image"]
        self.env_file = root / "env.json"
        controls = root / "control.json"
        self.controls = json.loads(controls.read_text()) if controls.exists() else {}

    def real_run(self, args: list[str]) -> subprocess.CompletedProcess:
        """The real smolvm, on the fake's own state directory, in the environment the caller gave."""
        argv = [self.real, "--state-dir", str(self.root / "real-state"), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=os.environ | self.real_env, check=False)

    def status(self, name: str) -> dict[str, Any] | None:
        result = self.real_run(["machine", "status", "--name", name, "--json"])
        return json.loads(result.stdout) if result.returncode == 0 else None

    def container(self, name: str) -> str:
        return CONTAINER_PREFIX + name

    def running(self, name: str) -> int | None:
        """The stand-in's pid if it runs."""
        result = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", self.container(name)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        pid = int(result.stdout.strip() or 0) if result.returncode == 0 else 0
        return pid or None

    def remove(self, name: str) -> None:
        subprocess.run(["docker", "rm", "-f", self.container(name)], capture_output=True, check=False)

    def made(self) -> dict[str, dict[str, list[str]]]:
        """What each machine was created with that the boot needs: its `env` and its `volumes`."""
        return json.loads(self.env_file.read_text()) if self.env_file.exists() else {}

    def start(self, name: str) -> int:
        machine = self.status(name)
        if machine is None:
            return _error("NOT_FOUND", f"vm not found: {name}")
        if self.running(name):
            print(f"Machine '{name}' is already running")
            return 0
        network = _network_holding(machine.get("allowed_cidrs") or [])
        if network is None:
            return _error("SMOLVM_ERROR", "fake: no docker network holds the machine's allowed CIDR")
        dns = ["--dns", machine["dns"]] if machine.get("dns") else []
        volumes = [arg for volume in self.made().get(name, {}).get("volumes", []) for arg in ("-v", volume)]
        subprocess.run(
            ["docker", "run", "-d", "--name", self.container(name), "--label", "bottle.test=fake-vm",
             "--network", "none", *dns, *volumes, "--entrypoint", "/bin/sleep", self.vm_image, "2147483647"],
            capture_output=True, check=True,
        )  # fmt: skip
        pid = self.running(name) or 0
        _plug(pid, network, name)
        if self.controls.get("net") != "open":
            _confine(pid, machine.get("allowed_cidrs") or [], tcp_only=self.controls.get("net") == "udp")
        print(f"Machine '{name}' started")
        return 0

    def exec(self, args: list[str], command: list[str]) -> int:
        name = _flag(args, "--name")  # exec takes only the long form
        if "-n" in args or name is None or not self.running(name):  # the real one says what is wrong
            result = self.real_run(args + ["--", *command])
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.returncode
        env = [arg for entry in self.made().get(name, {}).get("env", []) for arg in ("-e", entry)]
        tty = ["-t"] if "-t" in args or "--tty" in args else []
        return subprocess.run(["docker", "exec", "-i", *tty, *env, self.container(name), *command],
                              check=False).returncode  # fmt: skip

    def passthrough(self, args: list[str], command: list[str], words: list[str]) -> int:
        result = self.real_run(args + (["--", *command] if command or "--" in args else []))
        out = result.stdout
        if result.returncode == 0 and words[1:2] in (["ls"], ["list"], ["status"]) and "--json" in args:
            out = json.dumps(self.patched(json.loads(out)), indent=2) + "\n"
        if result.returncode == 0 and words[1:2] == ["create"]:
            self.remember(args)
        if result.returncode == 0 and words[1:2] == ["delete"]:
            self.remove(_flag(args, "--name", "-n") or "default")
        sys.stdout.write(out)
        sys.stderr.write(result.stderr)
        return result.returncode

    def patched(self, listed: Any) -> Any:
        """Machines whose stand-in runs are `running`, with its pid, as a booted machine would be."""
        for machine in listed if isinstance(listed, list) else [listed]:
            if pid := self.running(machine["name"]):
                machine["state"], machine["pid"] = "running", pid
        return listed

    def remember(self, args: list[str]) -> None:
        name = _flag(args, "--name", "-n") or "default"
        smolfile = _flag(args, "--smolfile", "-s")
        data = tomllib.loads(Path(smolfile).read_text()) if smolfile else {}
        env, volumes = data.get("env", []), data.get("volumes", [])
        given = {"env": env + [v for i, v in enumerate(args) if i and args[i - 1] in ("-e", "--env")],
                 "volumes": volumes + [v for i, v in enumerate(args) if i and args[i - 1] in ("-v", "--volume")]}
        with open(self.root / "env.lock", "w") as lock:  # creates run at once: one read-modify-write at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            partial = self.env_file.with_suffix(f".{os.getpid()}")
            partial.write_text(json.dumps(self.made() | {name: given}))
            os.replace(partial, self.env_file)


def _flag(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def _error(code: str, message: str) -> int:
    sys.stderr.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")
    return 1


def _network_holding(cidrs: list[str]) -> dict[str, Any] | None:
    """The docker network (as `docker network inspect` shows it) whose subnet holds the first allowed CIDR."""
    if not cidrs:
        return None
    address = ipaddress.ip_network(cidrs[0], strict=False).network_address
    ids = subprocess.run(["docker", "network", "ls", "-q"], capture_output=True, text=True, check=True).stdout
    found = subprocess.run(["docker", "network", "inspect", *ids.split()], capture_output=True, text=True, check=False)
    for network in json.loads(found.stdout or "[]"):
        for pool in (network.get("IPAM") or {}).get("Config") or []:
            subnet = pool.get("Subnet", "")
            if subnet and ":" not in subnet and address in ipaddress.ip_network(subnet):
                return network | {"subnet": subnet, "gateway": pool.get("Gateway")}
    return None


def _plug(pid: int, network: dict[str, Any], name: str) -> None:
    """Wire the stand-in into the network's bridge with a veth pair, at the subnet's last address.

    Not as a docker endpoint: a VM is not a container on the network, and bottle refuses to adopt a
    network with a stranger attached.
    """
    subnet = ipaddress.ip_network(network["subnet"])
    bridge = (network.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{network['Id'][:12]}"
    host_end = f"fk{zlib.crc32(name.encode()):08x}"
    steps = [
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", str(pid)],
        ["ip", "link", "set", host_end, "master", bridge, "up"],
        ["nsenter", "-t", str(pid), "-n", "ip", "addr", "add", f"{subnet.broadcast_address - 1}/{subnet.prefixlen}",
         "dev", "eth0"],
        ["nsenter", "-t", str(pid), "-n", "ip", "link", "set", "eth0", "up"],
        ["nsenter", "-t", str(pid), "-n", "ip", "route", "add", "default", "via", network["gateway"]],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)


def _confine(pid: int, cidrs: list[str], *, tcp_only: bool = False) -> None:
    """Outbound traffic from the stand-in only to `cidrs` (and its own loopback); the rest is rejected
    (with `tcp_only`, only TCP is: a leak for tests to catch)."""
    enter = ["nsenter", "-t", str(pid), "-n"]
    rules = [["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"]]
    rules += [["-A", "OUTPUT", "-d", cidr, "-j", "ACCEPT"] for cidr in cidrs if ":" not in cidr]
    rules += [["-A", "OUTPUT", *(["-p", "tcp"] if tcp_only else []), "-j", "REJECT"]]
    for rule in rules:
        subprocess.run([*enter, "iptables", *rule], check=True, capture_output=True)
    subprocess.run([*enter, "ip6tables", "-P", "OUTPUT", "DROP"], check=True, capture_output=True)


def _words(args: list[str]) -> list[str]:
    """The subcommand words, global flags and their values skipped."""
    words, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--error-format", "--state-dir"):
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
            if len(words) == 2:
                break
    return words


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(os.environ[STATE_ENV])
    with open(root / "calls.jsonl", "a") as log:
        log.write(json.dumps(argv) + "\n")
    args, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    words = _words(args)
    step = "-".join(words).replace("machine-list", "machine-ls")
    fake = _Fake(root)
    if fake.controls.get("hang") == step:
        (root / f"hanging-{step}").write_text(str(os.getpid()))
        time.sleep(3600)
    if fake.controls.get("fail") == step:
        return _error("SMOLVM_ERROR", f"{step} failed: injected by the test")
    name = _flag(args, "--name", "-n") or "default"
    if words == ["machine", "start"]:
        return fake.start(name)
    if words == ["machine", "stop"] and fake.running(name):
        fake.remove(name)
        print(f"Machine '{name}' stopped")
        return 0
    if words == ["machine", "exec"]:
        return fake.exec(args, command)
    return fake.passthrough(args, command, words)


if __name__ == "__main__":
    sys.exit(main())
