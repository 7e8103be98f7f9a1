"""`tallygate demo` and `tallygate simulate`: the simulated upstream, alone or behind tallygate."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
from typing import Any

import yaml
from aiohttp import web

from tallygate.compat import listening_port
from tallygate.config import Listen, ListenError, Metering, load_config_text
from tallygate.core.tokens import Tokenizers
from tallygate.dev.simulator import Simulator, SimulatorSettings
from tallygate.proxy.server import Running, run_loop, serve
from tallygate.runtime.encodings import TokenizerError, load_tokenizers

log = logging.getLogger("tallygate.dev.demo")

CURL = (
    "curl -N --compressed http://{listen}/v1/chat/completions -H 'Content-Type: application/json' "
    """-d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Hi"}}]}}'"""
)


def simulator_tokenizers() -> Tokenizers | None:
    """The encodings tallygate estimates with by default, so that the simulated usage is what
    tallygate's estimate counts; None (about four characters a token) without them."""
    try:
        return load_tokenizers(Metering().default_encoding)
    except TokenizerError as error:
        log.warning("%s The simulator reports about four characters a token.", error)
        return None


async def _start_simulator(
    listen: Listen, settings: SimulatorSettings, tokenizers: Tokenizers | None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(Simulator(settings, tokenizers).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise ListenError.of(listen, error) from None
    return runner, listening_port(site, listen.port)


def run_simulator(listen: Listen, settings: SimulatorSettings) -> None:
    async def main() -> None:
        runner, port = await _start_simulator(listen, settings, simulator_tokenizers())
        log.info(
            "simulated upstream on http://%s:%d (OpenAI, Anthropic, Ollama)", listen.host, port
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await stop.wait()
        await runner.cleanup()

    run_loop(main())


def demo_config(
    listen: Listen, admin: Listen, upstream: str, estimate: bool, ledger: str = "off"
) -> dict[str, Any]:
    return {
        "listen": str(listen),
        "admin": {"listen": str(admin)},
        "access_log": "stdout",
        "upstreams": {name: {"url": upstream} for name in ("openai", "anthropic", "ollama")},
        "routes": [
            {"path_prefix": "/v1/messages", "upstream": "anthropic"},
            {"path_prefix": "/api", "upstream": "ollama"},
            {"path_prefix": "/", "upstream": "openai"},
        ],
        # Drain: a client that leaves still gets its stream metered to the provider's usage, so
        # the dashboard's "paid for, not delivered" panel has something to show.
        "metering": {"estimate": estimate, "on_client_disconnect": "drain"},
        "shutdown_grace": "2s",
        "ledger": ledger,
    }


def run_demo(listen: Listen, admin: Listen, settings: SimulatorSettings) -> None:
    async def main() -> None:
        try:
            tokenizers = load_tokenizers(Metering().default_encoding)
        except TokenizerError as error:
            # The demo runs anywhere: without the encodings it still shows the provider's usage.
            log.warning("%s Token estimates are off for this demo.", error)
            tokenizers = None
        # The simulator counts with tallygate's own tokenizers: its usage and the estimates agree.
        runner, port = await _start_simulator(Listen("127.0.0.1", 0), settings, tokenizers)
        upstream = f"http://127.0.0.1:{port}"
        estimate = tokenizers is not None
        # A ledger of its own, gone with the demo: `tallygate usage --ledger` reads it meanwhile.
        scratch = tempfile.mkdtemp(prefix="tallygate-demo-")
        ledger = f"sqlite:///{scratch}/usage.db"
        config = load_config_text(
            yaml.safe_dump(demo_config(listen, admin, upstream, estimate, ledger)), {}
        )

        def banner(running: Running) -> None:  # once both listeners are up, with their ports
            proxy = Listen(listen.host, running.proxy_port)
            print(
                "\ntallygate demo: a simulated LLM upstream (OpenAI chat and Responses, Anthropic,"
                f" Ollama) behind tallygate.\n  Send requests to http://{proxy}, for example:\n"
                + "    " + CURL.format(listen=proxy)
                + f"\n  Metrics: http://{Listen(admin.host, running.admin_port)}/metrics"
                + "\n  Usage records: printed here, one JSON line per request; totals:"
                + f" tallygate usage --ledger {ledger}"
                + "\n  Stop with Ctrl-C.\n",
                file=sys.stderr,
                flush=True,
            )  # fmt: skip

        try:
            await serve(config, tokenizers, ready=banner)
        finally:
            await runner.cleanup()
            shutil.rmtree(scratch, ignore_errors=True)

    run_loop(main())
