"""The `tallygate` command line. Only argument handling and printing; the work is elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

import yaml

from tallygate import __version__
from tallygate.config import Config, ConfigError, ListenError, effective_config, load_config


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("TALLYGATE_CONFIG"),
        help="YAML configuration file (default: $TALLYGATE_CONFIG)",
    )


def _load(path: str | None) -> Config | None:
    if not path:
        print(
            "error: no configuration: pass --config PATH or set TALLYGATE_CONFIG", file=sys.stderr
        )
        return None
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from tallygate.runtime.encodings import TokenizerError, tokenizers_for
    from tallygate.runtime.workers import run

    try:
        tokenizers = tokenizers_for(config)
    except TokenizerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if config.ledger.url is not None:  # it opens (and its schema is brought up to date) now
        from tallygate.ledger.store import LedgerError, open_store

        try:
            open_store(config.ledger.url).close()
        except LedgerError as error:
            print(f"error: {error} (set ledger.url, or ledger: off)", file=sys.stderr)
            return 1
    run(config, tokenizers, args.config)
    return 0


def _usage(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from tallygate.ledger.report import GROUPS, period_bounds, render, totals
    from tallygate.ledger.store import LedgerError, open_store

    url = args.ledger
    if url is None:
        config = _load(args.config)
        if config is None:
            return 1
        url = config.ledger.url
        if url is None:
            print("error: the configuration has ledger: off", file=sys.stderr)
            return 1
    by = [group.strip() for group in args.by.split(",") if group.strip()] if args.by else []
    unknown = [group for group in by if group not in GROUPS]
    if unknown:
        print(f"error: --by {unknown[0]}: one of {', '.join(GROUPS)}", file=sys.stderr)
        return 1
    try:
        tz = ZoneInfo(args.tz)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"error: --tz {args.tz}: not a time zone (e.g. UTC, Europe/Paris)", file=sys.stderr)
        return 1
    try:
        start, end = period_bounds(args.since, args.until, tz, datetime.now(UTC))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        store = open_store(url)
    except LedgerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        since_ms = int(start.timestamp() * 1000) if start else None
        until_ms = int(end.timestamp() * 1000) if end else None
        entries = totals(store.rows(since_ms, until_ms), by, tz)
    finally:
        store.close()
    sys.stdout.write(render(entries, by, args.format))
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    sys.stdout.write(yaml.safe_dump(effective_config(config), sort_keys=False))
    from tallygate.compat import untested_versions
    from tallygate.config.checks import config_warnings

    for warning in (*config_warnings(config), *untested_versions()):
        print(f"warning: {warning}", file=sys.stderr)
    _warn_price_table_age(datetime.now(UTC).date())
    return 0


def _warn_price_table_age(today: date) -> None:
    from tallygate.config.prices import default_price_table
    from tallygate.core.pricing import price_table_age_warning

    warning = price_table_age_warning(default_price_table().date, today)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)


def _fetch(args: argparse.Namespace) -> int:
    from tallygate.core.tokens import ENCODINGS
    from tallygate.runtime.encodings import fetch_encodings

    try:
        files = fetch_encodings(args.dir, args.encoding or ENCODINGS)
    except Exception as error:
        print(f"error: cannot download encodings: {error}", file=sys.stderr)
        return 1
    print(f"{len(files)} files in {args.dir}; run with TIKTOKEN_CACHE_DIR={args.dir}")
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from tallygate.policy.tenants import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("error: no key given (pass it as an argument or on standard input)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _simulator_settings(args: argparse.Namespace) -> Any:
    from tallygate.config import parse_duration
    from tallygate.dev.simulator import SimulatorSettings

    return SimulatorSettings(
        ttft=parse_duration(args.ttft) if args.ttft not in ("0", "0s") else 0.0,
        tokens_per_second=args.tokens_per_second,
        output_tokens=args.output_tokens,
        error_rate=args.error_rate,
        midstream_failure_rate=args.midstream_failure_rate,
        error_status=args.error_status,
        seed=args.seed,
    )


def _simulate(args: argparse.Namespace) -> int:
    from tallygate.config import parse_listen
    from tallygate.dev.demo import run_simulator

    run_simulator(parse_listen(args.listen), _simulator_settings(args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tallygate.config import parse_listen
    from tallygate.dev.demo import run_demo

    run_demo(parse_listen(args.listen), parse_listen(args.admin), _simulator_settings(args))
    return 0


def _checked(parse: Any) -> Any:
    """An argparse type that refuses what `parse` refuses, with its message, as a usage error
    (exit 2, the option named), and passes the text on as it is."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return check


def _duration_or_zero(text: str) -> float:
    from tallygate.config import parse_duration

    return 0.0 if text in ("0", "0s") else parse_duration(text)


def _listen(text: str) -> object:
    from tallygate.config import parse_listen

    return parse_listen(text)


def _http_error_status(text: str) -> int:
    if not text.isdigit() or not 400 <= int(text) <= 599:
        raise argparse.ArgumentTypeError(f"expected an HTTP error status (400-599), got {text!r}")
    return int(text)


def _add_simulator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ttft", default="200ms", type=_checked(_duration_or_zero), metavar="DURATION",
        help="time to the first token (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-per-second", type=float, default=50.0,
        help="output pace; 0: no pacing (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--output-tokens", type=int, default=64, help="words in each answer (default: %(default)s)"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0,
        help="share of requests answered with an error, 0 to 1 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--midstream-failure-rate", type=float, default=0.0,
        help="share of streams cut halfway, 0 to 1 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--error-status", type=_http_error_status, default=None,
        help="the status of those errors, e.g. 429 (default: each API's own: 500, Anthropic's"
        " 529, Ollama's 503)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=None, help="for the same answers every run (default: random)"
    )


_LOG_LEVELS = ["debug", "info", "warning", "error"]
_SERVE_EPILOG = (
    "signals: SIGHUP reloads the configuration (a bad file is refused and the running one\n"
    "stays); SIGUSR1 reopens the access log (after logrotate moved it); SIGTERM drains and\n"
    "stops.\n\n"
    "environment: TALLYGATE_CONFIG (the configuration, when --config is absent),\n"
    "TALLYGATE_LOG_LEVEL, TIKTOKEN_CACHE_DIR (where tiktoken's encodings are; without\n"
    "internet, fill it with `tallygate tokenizers fetch --dir DIR` elsewhere)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tallygate",
        description="A streaming reverse proxy for LLM APIs that meters tokens and egress.",
    )
    parser.add_argument("--version", action="version", version=f"tallygate {__version__}")
    parser.add_argument(
        "--log-level", default=os.environ.get("TALLYGATE_LOG_LEVEL", "info"),
        choices=_LOG_LEVELS, help="(also after the command; default: $TALLYGATE_LOG_LEVEL, info)",
    )  # fmt: skip
    # Each command takes --log-level too, so `tallygate serve --log-level debug` works; its
    # default leaves the top-level one alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=_LOG_LEVELS, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    serve = commands.add_parser(
        "serve", help="run the proxy", parents=[common], epilog=_SERVE_EPILOG, formatter_class=raw
    )
    _add_config_option(serve)
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check", help="validate a configuration and print it, with secrets masked",
        parents=[common],
    )  # fmt: skip
    _add_config_option(check)
    check.set_defaults(func=_check)

    tokenizers = commands.add_parser(
        "tokenizers", help="manage tiktoken encodings", parents=[common]
    )
    tokenizer_commands = tokenizers.add_subparsers(dest="tokenizers_command", required=True)
    fetch = tokenizer_commands.add_parser(
        "fetch", help="download encodings into a directory, for offline images", parents=[common]
    )
    fetch.add_argument("--dir", required=True, help="where to put them (TIKTOKEN_CACHE_DIR)")
    fetch.add_argument(
        "--encoding", action="append", help="an encoding to fetch (default: all tallygate uses)"
    )
    fetch.set_defaults(func=_fetch)

    usage = commands.add_parser(
        "usage", help="who spent what: totals from the ledger, grouped", parents=[common],
        description="Totals of requests, tokens by bucket, bytes and cost (USD) from the "
        "ledger, for a period, grouped any way. Reads the ledger directly: tallygate may be "
        "running or not.",
    )  # fmt: skip
    _add_config_option(usage)
    usage.add_argument("--ledger", help="the ledger's URL (default: the configuration's)")
    usage.add_argument(
        "--since", help="a date (YYYY-MM-DD) or today, yesterday, this-week, this-month, "
        "last-month (default: the beginning)",
    )  # fmt: skip
    usage.add_argument("--until", help="a date or a period, not included (default: now)")
    usage.add_argument(
        "--by", default="", help="comma-separated: tenant, user, session, model, upstream, key, "
        "tag, day, week, month (default: one total)",
    )  # fmt: skip
    usage.add_argument(
        "--tz", default="UTC", help="the time zone of dates and days (default: %(default)s)"
    )
    usage.add_argument(
        "--format", default="table", choices=["table", "csv", "json", "ndjson"],
        help="(default: %(default)s)",
    )  # fmt: skip
    usage.set_defaults(func=_usage)

    hashing = commands.add_parser(
        "hash-key", help="print the SHA-256 of a client key, for tenants.<name>.keys",
        parents=[common],
    )  # fmt: skip
    hashing.add_argument(
        "key", nargs="?", help="the key (default: read one line from standard input)"
    )
    hashing.set_defaults(func=_hash_key)

    simulate = commands.add_parser(
        "simulate", help="run a simulated LLM upstream (OpenAI, Anthropic, Ollama), no key needed",
        parents=[common],
    )  # fmt: skip
    simulate.add_argument(
        "--listen", default="127.0.0.1:8001", type=_checked(_listen), metavar="HOST:PORT",
        help="where to listen (default: %(default)s)",
    )  # fmt: skip
    _add_simulator_options(simulate)
    simulate.set_defaults(func=_simulate)

    demo = commands.add_parser(
        "demo", help="tallygate in front of the simulated upstream: try it with no key, no network",
        parents=[common],
    )  # fmt: skip
    demo.add_argument(
        "--listen", default="127.0.0.1:8080", type=_checked(_listen), metavar="HOST:PORT",
        help="tallygate's proxy (default: %(default)s)",
    )  # fmt: skip
    demo.add_argument(
        "--admin", default="127.0.0.1:9464", type=_checked(_listen), metavar="HOST:PORT",
        help="tallygate's admin listener, /metrics (default: %(default)s)",
    )  # fmt: skip
    _add_simulator_options(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except ListenError as error:  # an address in use: one line, not a traceback
        print(f"tallygate: {error}", file=sys.stderr)
        return 1
    return code
