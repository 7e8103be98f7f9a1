"""The `tallygate` command line. Only argument handling and printing; the work is elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from . import __version__
from .config import Config, ConfigError, effective_config, load_config


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
    from .server import load_tokenizers, run  # aiohttp and uvloop load only to serve
    from .tokens import TokenizerError

    try:
        tokenizers = load_tokenizers(config)
    except TokenizerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    run(config, tokenizers)
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    sys.stdout.write(yaml.safe_dump(effective_config(config), sort_keys=False))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from .tokens import ENCODINGS, fetch_encodings

    try:
        files = fetch_encodings(args.dir, args.encoding or ENCODINGS)
    except Exception as error:
        print(f"error: cannot download encodings: {error}", file=sys.stderr)
        return 1
    print(f"{len(files)} files in {args.dir}; run with TIKTOKEN_CACHE_DIR={args.dir}")
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    from .tenants import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("error: no key given (pass it as an argument or on standard input)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tallygate",
        description="A streaming reverse proxy for LLM APIs that meters tokens and egress.",
    )
    parser.add_argument("--version", action="version", version=f"tallygate {__version__}")
    parser.add_argument(
        "--log-level", default=os.environ.get("TALLYGATE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _add_config_option(serve)
    serve.set_defaults(func=_serve)

    check = commands.add_parser(
        "check", help="validate a configuration and print it, with secrets masked"
    )
    _add_config_option(check)
    check.set_defaults(func=_check)

    tokenizers = commands.add_parser("tokenizers", help="manage tiktoken encodings")
    tokenizer_commands = tokenizers.add_subparsers(dest="tokenizers_command", required=True)
    fetch = tokenizer_commands.add_parser(
        "fetch", help="download encodings into a directory, for offline images"
    )
    fetch.add_argument("--dir", required=True, help="where to put them (TIKTOKEN_CACHE_DIR)")
    fetch.add_argument(
        "--encoding", action="append", help="an encoding to fetch (default: all tallygate uses)"
    )
    fetch.set_defaults(func=_fetch)

    hashing = commands.add_parser(
        "hash-key", help="print the SHA-256 of a client key, for tenants.<name>.keys"
    )
    hashing.add_argument(
        "key", nargs="?", help="the key (default: read one line from standard input)"
    )
    hashing.set_defaults(func=_hash_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    code: int = args.func(args)
    return code
