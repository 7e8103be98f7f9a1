"""Every use of aiohttp's, asyncio's and tiktoken's private parts, and the versions they hold for.

tallygate reaches past three libraries' public APIs where the public API cannot do the job
(each use below says why). Those parts can change in any release, so pyproject.toml pins
aiohttp and tiktoken to the minor versions the suite has run against (`TESTED`), and `serve`
and `check` warn when the installed ones are outside (`untested_versions`).

Functions here read or set one private attribute each. Three subclasses of aiohttp's classes
also override or read its internals, and stay where they are because that is what they are
made of; the tests named with them fail when aiohttp changes what they rely on:
- `proxy/connection.py` `ClientConnection` (aiohttp's `RequestHandler`): `_make_error_handler`,
  `_messages`, `_waiter`, `_request_in_progress`, `_request_count`, `_loop` (a head timeout
  answered with a record: tests/test_hostile_clients.py);
  `Listener` (`web.Server`): `_connections`, `_kwargs`, `_loop` (tests/test_lifecycle.py).
- `proxy/server.py` `_UpstreamProtocol` (aiohttp's client `ResponseHandler`): `_reading_paused`,
  `_payload`, `_should_close` (tests/test_hostile_upstreams.py, bench/instructions.py).

This module imports no library at load time, so pure modules may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import TCPConnector, web

# The minor versions the suite ran against, and pyproject.toml's pins: [low, high).
TESTED = {"aiohttp": ("3.14", "3.15"), "tiktoken": ("0.14", "0.15")}


def untested_versions(installed: Callable[[str], str] | None = None) -> list[str]:
    """A warning for each library installed at a version outside `TESTED`."""
    if installed is None:
        from importlib.metadata import version

        installed = version
    warnings = []
    for name, (low, high) in TESTED.items():
        try:
            found = installed(name)
        except Exception:  # not installed as a distribution (a source tree): nothing to say
            continue
        if not _version(low) <= _version(found) < _version(high):
            warnings.append(
                f"{name} {found} is installed; tallygate is tested with {name} >={low},<{high}, "
                f"and uses its private parts (tallygate/compat.py)"
            )
    return warnings


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


# -- tiktoken ------------------------------------------------------------------------------------


def split_pattern(encoding: Any) -> str:
    """tiktoken's pre-tokenizer regex for `encoding`: counting piece by piece as text streams
    in needs the same split (tiktoken has no public accessor)."""
    return str(encoding._pat_str)


def token_buffer(encoding: Any) -> Callable[[str, frozenset[str]], Any] | None:
    """tiktoken's encoder into one buffer (what its public `encode_to_numpy` uses, without
    numpy): counting a long prompt without building a list of its tokens. None when absent."""
    return getattr(getattr(encoding, "_core_bpe", None), "encode_to_tiktoken_buffer", None)


# -- aiohttp and asyncio -------------------------------------------------------------------------


def bytes_written(response: web.StreamResponse) -> int:
    """Every byte written to the client for `response` so far (head, chunk framing, body):
    aiohttp's payload writer counts them, until `write_eof`; `body_length` after."""
    writer = getattr(response, "_payload_writer", None)
    return int(writer.output_size) if writer is not None else response.body_length


def listening_port(site: web.TCPSite, default: int) -> int:
    """The port a site listens on, when the OS chose it (aiohttp's site keeps its server
    private)."""
    sockets = getattr(getattr(site, "_server", None), "sockets", None) or ()
    return int(sockets[0].getsockname()[1]) if sockets else default


def use_protocol(connector: TCPConnector, factory: Callable[[], Any]) -> None:
    """Have `connector` build its connections' protocol with `factory` (aiohttp has no public
    hook for it)."""
    connector._factory = factory  # type: ignore[assignment]


def head_timeout_entry(status: int, exc: BaseException, message: str) -> Any:
    """An entry for aiohttp's server error queue: the request is answered by the handler's
    `_make_error_handler`, the way aiohttp answers a head it could not parse."""
    from aiohttp.web_protocol import _ErrInfo

    return _ErrInfo(status=status, exc=exc, message=message)


def leave_running_loop() -> None:
    """In a forked child: forget the parent's running event loop, so the child can run its own
    (asyncio has no public way; `asyncio.run` refuses while one is set)."""
    import asyncio

    asyncio.events._set_running_loop(None)
