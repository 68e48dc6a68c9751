"""The bundle runs mitmproxy with a short list of addons: the ones its safety rests on must be in it."""

import asyncio

from mitmproxy import options
from mitmproxy.master import Master
from mitmproxy.test import tflow

from bottle.bundle.__main__ import proxy_addons


def _master() -> Master:
    async def build() -> Master:
        master = Master(options.Options(), with_termlog=False)
        master.addons.add(*proxy_addons())
        return master

    return asyncio.run(build())


def test_the_proxy_and_its_safety_addons_are_loaded():
    names = {type(addon).__name__ for addon in _master().addons.chain}
    assert {"Core", "Block", "DisableH2C", "Proxyserver", "NextLayer", "TlsConfig", "ErrorCheck"} <= names


def test_the_options_that_keep_the_proxy_safe_have_their_safe_defaults():
    opts = _master().options
    assert opts.block_global and opts.validate_inbound_headers and not opts.ssl_insecure
    opts.update(body_size_limit="128m")  # the option exists (it is Proxyserver's) and parses


def test_a_client_from_a_public_address_is_refused():
    async def connect() -> str | None:
        master = Master(options.Options(), with_termlog=False)
        master.addons.add(*proxy_addons())
        client = tflow.tclient_conn()
        client.peername = ("93.184.216.34", 40000)  # a public address (documentation ranges are not "global")
        master.addons.get("block").client_connected(client)
        return client.error

    assert asyncio.run(connect())


def test_the_hook_dispatch_keeps_mitmproxys_order_error_handling_and_halt():
    from mitmproxy import exceptions, hooks

    from bottle.bundle.__main__ import dispatch_once

    calls: list[str] = []

    class Recording:
        def __init__(self, name: str, fail: bool = False, halt: bool = False):
            self.name, self.fail, self.halt = name, fail, halt

        async def running(self) -> None:
            calls.append(self.name)
            if self.fail:
                raise RuntimeError("an addon's bug")
            if self.halt:
                raise exceptions.AddonHalt

    class Silent:
        pass  # no handler for the hook: skipped

    async def run() -> None:
        master = Master(options.Options(), with_termlog=False)
        master.addons.add(Recording("first", fail=True), Silent(), Recording("second", halt=True), Recording("third"))
        dispatch_once(master)
        for _ in range(2):  # the second time from the table made the first time
            await master.addons.trigger_event(hooks.RunningHook())

    asyncio.run(run())
    assert calls == ["first", "second"] * 2  # the error is logged and the rest run; AddonHalt stops them
