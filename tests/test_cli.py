"""The command line and `tallygate check`: warnings about configurations that do not do what they
seem to, output that round-trips, options where a user types them, messages that say where."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tallygate import cli
from tallygate.config import (
    ConfigError,
    effective_config,
    load_config,
    load_config_text,
    parse_duration,
)
from tallygate.config.checks import config_warnings

from conftest import ROOT

HASH = "ab" * 32


def config(text: str) -> str:
    return "upstreams:\n  openai: {url: 'https://api.openai.com'}\n" + text


def warnings_of(text: str) -> list[str]:
    return config_warnings(load_config_text(text, {}))


def test_a_route_that_can_never_match_is_warned_about() -> None:
    shadowed = warnings_of(config(
        "routes:\n  - {path_prefix: /, upstream: openai}\n"
        "  - {path_prefix: /v1/messages, upstream: openai}\n"
        "  - {path_prefix: /v1/, upstream: openai}\n"
    ))  # fmt: skip
    assert len(shadowed) == 2 and shadowed[0].startswith("routes[1] (/v1/messages) never matches")
    nested = warnings_of(config(
        "routes:\n  - {path_prefix: /v1, upstream: openai}\n"
        "  - {path_prefix: /v1/messages, upstream: openai}\n"
    ))  # fmt: skip
    assert nested and nested[0].startswith("routes[1]")
    assert warnings_of(config(  # the longer prefix first: both can match
        "routes:\n  - {path_prefix: /v1/messages, upstream: openai}\n"
        "  - {path_prefix: /v1/messagesX, upstream: openai}\n"
        "  - {path_prefix: /, upstream: openai}\n"
    )) == []  # fmt: skip


def test_an_upstream_url_ending_in_v1_is_warned_about() -> None:
    text = (
        "upstreams:\n  openai: {url: 'https://api.openai.com/v1/'}\n"
        "  groq: {url: 'https://api.groq.com/openai/v1'}\n"
        "  fine: {url: 'https://api.example.com/v1beta'}\n"
        "routes:\n  - {path_prefix: /, upstream: openai}\n"
    )
    found = warnings_of(text)
    assert [w.split(" ", 1)[0] for w in found] == ["upstreams.openai.url", "upstreams.groq.url"]
    assert "/v1/v1/" in found[0] or "v1/..." in found[0]


@pytest.mark.parametrize(
    ("listen", "require_key", "api_key", "warned"),
    [
        ("0.0.0.0:8080", False, True, True),
        (":8080", False, True, True),
        ("10.0.0.5:8080", False, True, True),
        ("127.0.0.1:8080", False, True, False),  # loopback: only this host
        ("[::1]:8080", False, True, False),
        ("0.0.0.0:8080", True, True, False),  # clients need a tallygate key
        ("0.0.0.0:8080", False, False, False),  # clients bring their own provider keys
    ],
)
def test_injected_keys_on_a_reachable_listener_need_issued_keys(
    listen: str, require_key: bool, api_key: bool, warned: bool
) -> None:
    key = ", api_key: sk-real" if api_key else ""
    text = (
        f"listen: '{listen}'\nupstreams:\n  openai: {{url: 'https://api.openai.com'{key}}}\n"
        "routes:\n  - {path_prefix: /, upstream: openai}\n"
        f"tenants:\n  apps: {{keys: ['{HASH}']}}\nauth: {{require_key: {str(require_key).lower()}}}\n"
    )
    found = warnings_of(text)
    assert bool(found) is warned
    if warned:
        assert "auth.require_key" in found[0] and "openai" in found[0]


def test_the_shipped_examples_have_no_warnings() -> None:
    assert config_warnings(load_config(ROOT / "config.example.yaml", env={})) == []


def test_check_prints_the_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstreams:\n  openai: {url: 'https://api.openai.com/v1'}\n"
        "routes:\n  - {path_prefix: /, upstream: openai}\n"
    )
    assert cli.main(["check", "-c", str(path)]) == 0
    assert "warning: upstreams.openai.url ends in /v1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "path",
    [ROOT / "config.example.yaml", ROOT / "deploy" / "docker" / "config.yaml",
     ROOT / "deploy" / "docker" / "demo.yaml", None],
)  # fmt: skip
def test_checks_output_is_a_configuration_that_prints_the_same(
    path: Path | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if path is None:  # tenants, CORS, routes with their own settings
        path = tmp_path / "full.yaml"
        path.write_text(config(
            "routes:\n  - {path_prefix: /v1/messages, upstream: openai, cors: false}\n"
            "  - {path_prefix: /, upstream: openai, dialect: openai_chat}\n"
            f"tenants:\n  alice: {{keys: ['{HASH}']}}\n  bob: {{keys: ['{'cd' * 32}']}}\n"
            "auth: {require_key: true}\ntenant_header: X-Tenant\n"
            "cors: {allow_origins: ['https://chat.example.com'], max_age: 1h}\n"
            "pricing: {models: {my-model: {input: 1, output: 2}}}\n"
        ))  # fmt: skip
    assert cli.main(["check", "-c", str(path)]) == 0
    printed = capsys.readouterr().out
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert cli.main(["check", "-c", str(again)]) == 0
    assert capsys.readouterr().out == printed
    reloaded = load_config(again)
    assert effective_config(reloaded) == yaml.safe_load(printed)


def test_log_level_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--log-level", "debug"]).log_level == "debug"
    assert parser.parse_args(["--log-level", "error", "check"]).log_level == "error"
    assert parser.parse_args(["demo"]).log_level in ("info", "debug", "warning", "error")


def test_help_says_what_a_user_needs(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "demo", "simulate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if command == "serve":
            for word in ("SIGHUP", "SIGUSR1", "TIKTOKEN_CACHE_DIR", "TALLYGATE_CONFIG"):
                assert word in text
        else:
            for option in ("--ttft", "--tokens-per-second", "--output-tokens", "--error-rate",
                           "--midstream-failure-rate", "--seed", "--listen"):  # fmt: skip
                after = text.split(option, 2)[-1]
                assert "(default:" in after.split("--", 1)[0], (command, option)


@pytest.mark.parametrize(
    ("text", "seconds"), [("1d", 86400), ("2h30m", 9000), ("1h30m15s", 5415), ("1m30s", 90)]
)
def test_combined_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_negative_duration_says_it_must_be_positive_and_names_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config_text(
            config("routes:\n  - {path_prefix: /, upstream: openai}\nshutdown_grace: -1s\n"), {}
        )
    assert raised.value.problems == ["shutdown_grace: must be positive, got '-1s'"]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tallygate.yaml"
    path.write_text("upstreams:\n  openai: {url: x}\nroutes:\n  - path_prefix: /\n   upstream: a\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    [problem] = raised.value.problems
    assert problem.startswith(f"{path}:5:4: not valid YAML")
    assert "<unicode string>" not in problem


@pytest.mark.parametrize(
    "taken", ["proxy", "admin", "workers-admin", "demo", "demo-admin", "simulate"]
)
def test_an_address_in_use_is_one_line_and_exit_1(taken: str, tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        busy, free = f"127.0.0.1:{port}", "127.0.0.1:0"
        path = tmp_path / "c.yaml"
        workers = "workers: 2\n" if taken == "workers-admin" else ""
        proxy, admin = (busy, free) if taken == "proxy" else (free, busy)
        path.write_text(
            f"listen: '{proxy}'\nadmin: {{listen: '{admin}'}}\n{workers}"
            "upstreams: {a: {url: 'http://127.0.0.1:1'}}\nroutes: [{path_prefix: /, upstream: a}]\n"
        )
        argv = {
            "demo": ["demo", "--listen", busy, "--admin", free],
            "demo-admin": ["demo", "--listen", free, "--admin", busy],
            "simulate": ["simulate", "--listen", busy],
        }.get(taken, ["serve", "-c", str(path)])
        done = subprocess.run(
            [sys.executable, "-m", "tallygate", *argv], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert done.stderr == f"tallygate: cannot listen on {busy}: address already in use\n"


async def test_a_second_multi_worker_tallygate_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """The workers share their port with SO_REUSEPORT, which any process of the same user could
    join: a second tallygate must be refused, not served half the connections."""
    import asyncio
    import signal

    from conftest import start_serve

    config = {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "workers": 2,
        "upstreams": {"a": {"url": "http://127.0.0.1:1"}},
        "routes": [{"path_prefix": "/", "upstream": "a"}], "ledger": "off",
    }  # fmt: skip
    first, port, _, _ = await start_serve(tmp_path, config, workers=2)
    try:
        second = tmp_path / "second.yaml"
        second.write_text(yaml.safe_dump({**config, "listen": f"127.0.0.1:{port}"}))
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tallygate", "serve", "-c", str(second),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(done.communicate(), 30)
        except TimeoutError:  # it serves: stop it, and fail
            done.kill()
            await done.wait()
            raise
        assert done.returncode == 1
        assert (
            err.decode()
            == f"tallygate: cannot listen on 127.0.0.1:{port}: address already in use\n"
        )
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.wait(), 30)
