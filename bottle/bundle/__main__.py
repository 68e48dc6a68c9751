"""The bundle's entry point: validate the config, then serve the proxy on its port, and refuse DNS on
its DNS port, until stopped.

A config, secret or CA that does not load stops the bundle with one line on stderr; it never starts
with a partial or permissive policy.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bottle.bundle import CA_DIR, CONFIG_FILE, SECRETS_FILE
from bottle.bundle.addon import AuditSink, BottlePolicy, stdout_sink, stream_sink
from bottle.bundle.ca import CA_FILE, split_ca
from bottle.bundle.dns import listen as listen_dns
from bottle.bundle.policy import BundleConfig, Policy, Resolver, is_header_value, resolve

# The largest request or response body the proxy holds (mitmproxy buffers a body before bottle's policy
# sees it): larger ones are refused, so no agent can grow the bundle past its memory limit with one.
BODY_SIZE_LIMIT = "128m"
CONFIG_DIR = Path(os.environ.get("BOTTLE_BUNDLE_DIR", "/etc/bottle"))


def load_secrets(path: Path, config: BundleConfig) -> dict[str, str]:
    """The secrets file (a JSON object, name -> value); every secret a credential names must be in it.

    Each value must be a non-empty string that can go in a header as it is: no CR, LF or other control
    character, which would let a secret inject headers of its own.
    """
    needed = {c.secret for c in config.credentials}
    if not needed:
        return {}
    try:
        secrets = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the bundle's secrets {path}: {exc}") from None
    if not isinstance(secrets, dict):
        raise ValueError(f"the bundle's secrets file {path} is not a JSON object")
    missing = sorted(needed - set(secrets))
    if missing:
        raise ValueError(f"the bundle's secrets file has no value for {', '.join(missing)}")
    unusable = sorted(name for name in needed if not is_header_value(secrets[name]))
    if unusable:
        raise ValueError(
            f"the bundle's secrets {', '.join(unusable)} are not non-empty strings free of control characters"
        )
    return {name: secrets[name] for name in needed}


def check_ca(path: Path) -> None:
    """The CA file must hold a private key and the certificate that goes with it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the bundle's CA {path} ({exc.strerror}); run `bottle prepare` again") from None
    if split_ca(data) is None:
        raise ValueError(f"the bundle's CA {path} is not a key and its certificate; run `bottle prepare` again")


def proxy_addons() -> list[object]:
    """The mitmproxy addons the bundle runs besides its policy: the proxy and what keeps it safe, nothing else.

    mitmproxy's DumpMaster loads some thirty more (replay, scripts, flow files, header and body rewriting,
    the mitm.it onboarding app, ...), which bottle never configures; every hook of every request went
    through each of them, at a cost that showed in the benchmark. Kept:
      Core        validates options as they are set (a bad one stops the bundle rather than being ignored)
      Block       block_global: a client from a public address is refused, so the bundle is no open proxy
      DisableH2C  strips h2c upgrades and kills HTTP/2 prior-knowledge requests the proxy cannot parse
      Proxyserver the connections the front door hands it (bottle.bundle.front owns the port), and the
                  options the proxy layers read: connection_strategy, body_size_limit,
                  stream_large_bodies, validate_inbound_headers, ...
      NextLayer   picks each connection's layers: ignore_connection (passthrough), rawtcp (off), HTTP
      TlsConfig   the bundle's CA for the agent's side, and upstream verification (ssl_insecure,
                  ssl_verify_upstream_trusted_ca) with the server name the policy sets
      ErrorCheck  an error logged while starting (a port that cannot be bound) stops the bundle
    """
    from mitmproxy.addons import block, core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig

    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(), next_layer.NextLayer(),
            tlsconfig.TlsConfig(), errorcheck.ErrorCheck()]  # fmt: skip


async def serve(
    config: BundleConfig,
    secrets: dict[str, str],
    ca_file: Path,
    *,
    listen_host: str = "0.0.0.0",
    resolver: Resolver = resolve,
    audit: AuditSink = stdout_sink,
    upstream_ca: Path | None = None,
) -> None:
    """Run the proxy with bottle's policy until cancelled. `upstream_ca` is for tests' private servers.

    The DNS refuser binds first, so by the time the proxy answers (which is when bottle calls the bundle
    ready) every DNS query the VM makes is already refused and logged.
    """
    from mitmproxy import options
    from mitmproxy.master import Master
    from mitmproxy.proxy.mode_servers import ServerInstance

    from bottle.bundle.front import Bounds, Front, Mitmproxy

    with tempfile.TemporaryDirectory(prefix="bottle-bundle-") as confdir:
        shutil.copy(ca_file, Path(confdir) / CA_FILE)  # mitmproxy writes beside its CA; /etc/bottle is read-only
        opts = options.Options(confdir=confdir)
        master = Master(opts, with_termlog=True)
        master.addons.add(*proxy_addons())
        # rawtcp off: inside a tunnel, anything that is not TLS is parsed as HTTP and meets the policy,
        # never relayed as raw bytes past it.
        # server off: mitmproxy listens on nothing; the front door owns the port and hands it connections.
        master.options.update(connection_strategy="lazy", termlog_verbosity="warn", ssl_insecure=False, rawtcp=False,
                              body_size_limit=BODY_SIZE_LIMIT, server=False)  # fmt: skip
        if upstream_ca is not None:
            master.options.update(ssl_verify_upstream_trusted_ca=str(upstream_ca))
        policy = BottlePolicy(Policy(config, resolver), secrets, audit)
        bounds = Bounds(policy)
        master.addons.add(policy, bounds)  # after NextLayer, whose picks it amends
        dispatch_once(master)
        front = Front(policy, Mitmproxy(ServerInstance.make("regular", master.addons.get("proxyserver")), bounds))
        dns = await listen_dns(listen_host, config.dns_port, audit, clients=config.clients)
        try:
            proxy = await asyncio.start_server(front.handle, listen_host, config.port)
            try:
                await master.run()
            finally:
                proxy.close()
        finally:
            dns.close()


def dispatch_once(master: Any) -> None:
    """Give `master` a hook dispatch that finds the addons handling each hook once, not on every event.

    mitmproxy's AddonManager walks every addon (and its children) with getattr on every event, and most
    events (an UpdateHook after each flow hook, for one) have no handler at all: 19 hooks per intercepted
    request, each through eight addons. The addons are fixed once the bundle runs, so the ones with a
    handler for a hook are looked up on its first use and kept; each handler still runs under
    mitmproxy's safecall, in chain order, so an addon's error is logged as before and AddonHalt still
    stops the rest.
    """
    from mitmproxy import addonmanager, exceptions

    addons = master.addons
    handling: dict[str, list[Any]] = {}

    async def trigger_event(event: Any) -> None:
        found = handling.get(event.name)
        if found is None:
            found = handling[event.name] = [a for addon in addons.chain for a, _ in addons._iter_hooks(addon, event)]
        args = event.args() if found else []  # built from the event's dataclass fields: once, not per addon
        for addon in found:
            try:
                with addonmanager.safecall():
                    result = getattr(addon, event.name)(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return

    addons.trigger_event = trigger_event


def new_loop() -> asyncio.AbstractEventLoop:
    """The bundle's event loop: uvloop's where it is installed (the image has it), asyncio's otherwise.

    uvloop's loop and transports are C (libuv); they took 10 to 15% off the proxy's CPU time per
    request in benchmarks/proxy.py. Nothing in bottle's policy depends on which loop runs it.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main)


def main() -> int:
    if sys.argv[1:2] in (["noroute"], ["rpfilter"]):  # the docker backend's one-shot jobs (bottle.bundle.noroute)
        from bottle.bundle import noroute

        return noroute.main() if sys.argv[1] == "noroute" else noroute.rp_filter_main(*sys.argv[2:3] or [""])
    try:
        config = BundleConfig.load(CONFIG_DIR / CONFIG_FILE)
        secrets = load_secrets(CONFIG_DIR / SECRETS_FILE, config)
        ca_file = CONFIG_DIR / CA_DIR / CA_FILE
        check_ca(ca_file)
    except ValueError as exc:
        print(f"bottle-bundle: {exc}; refusing to start", file=sys.stderr)
        return 2
    # Say it in one line now rather than as a startup traceback.
    for port, kind, what in ((config.port, socket.SOCK_STREAM, ""), (config.dns_port, socket.SOCK_DGRAM, " (DNS, UDP)"),
                             (config.dns_port, socket.SOCK_STREAM, " (DNS, TCP)")):  # fmt: skip
        try:
            with socket.socket(type=kind) as probe:
                probe.bind(("0.0.0.0", port))
        except OSError as exc:
            print(f"bottle-bundle: cannot listen on :{port}{what} ({exc.strerror}); refusing to start", file=sys.stderr)
            return 2
    # stdout carries the audit log and nothing else: whatever else prints (mitmproxy's log, a
    # traceback) goes to stderr.
    audit = stream_sink(os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1))
    sys.stdout = sys.stderr
    print(f"bottle-bundle: serving on :{config.port} with {len(config.allow)} allow rules, refusing DNS on "
          f":{config.dns_port}", file=sys.stderr)  # fmt: skip
    run(serve(config, secrets, ca_file, audit=audit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
