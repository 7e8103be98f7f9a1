"""What a new user meets first (issue 16, points 8 to 11): `tallygate check` on every configuration
the repository ships (no warnings, output that round-trips), routes that can never match, options
where a user types them, durations as they are written, and the record's client fields."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from tallygate import cli
from tallygate.config import (
    ConfigError,
    effective_config,
    load_config,
    load_config_text,
    parse_duration,
    parse_size,
)
from tallygate.config.checks import config_warnings
from tallygate.policy.headers import client_address

from conftest import CASES, ROOT, FakeUpstream, ProxyFactory, RecordLog

HASH = "ab" * 32


def shipped_configs(tmp: Path) -> list[tuple[str, Path, dict[str, str]]]:
    """Every configuration the repository ships, the Kubernetes ConfigMaps' included, each with
    an environment that sets the variables it requires (a hash fits every one of them)."""
    found = [ROOT / "config.example.yaml", *sorted((ROOT / "deploy").rglob("*.yaml"))]
    out = []
    for path in found:
        texts: list[tuple[str, str]] = []
        if path.parent.name == "k8s":
            for document in yaml.safe_load_all(path.read_text()):
                if isinstance(document, dict) and document.get("kind") == "ConfigMap":
                    name = document["metadata"]["name"]
                    for key, text in document["data"].items():
                        if key.endswith((".yaml", ".yml")):
                            texts.append((f"{path.name}:{name}/{key}", text))
        else:
            text = path.read_text()
            document = yaml.safe_load(text)
            if isinstance(document, dict) and "upstreams" in document:  # a tallygate config
                texts.append((str(path.relative_to(ROOT)), text))
        for label, text in texts:
            file = tmp / re.sub(r"[^A-Za-z0-9.]+", "_", label)
            file.write_text(text)
            required = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)
            out.append((label, file, dict.fromkeys(required, HASH)))
    return out


def test_the_repository_ships_the_configurations_this_file_checks(tmp_path: Path) -> None:
    labels = [label for label, _, _ in shipped_configs(tmp_path)]
    assert "config.example.yaml" in labels
    assert any(label.startswith("deploy/docker/") for label in labels)
    assert sum(label.startswith(("edge.yaml", "sidecar.yaml")) for label in labels) == 2


def test_no_shipped_configuration_has_a_warning(tmp_path: Path) -> None:
    for label, path, env in shipped_configs(tmp_path):
        assert config_warnings(load_config(path, env)) == [], label


def test_checks_output_of_every_shipped_configuration_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for label, path, env in shipped_configs(tmp_path):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert cli.main(["check", "-c", str(path)]) == 0, label
        printed = capsys.readouterr().out
        again = tmp_path / "again.yaml"
        again.write_text(printed)
        assert cli.main(["check", "-c", str(again)]) == 0, label
        assert capsys.readouterr().out == printed, label


def test_a_configuration_with_every_kind_of_value_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(
        "listen: '[::1]:8443'\nadmin: {listen: '127.0.0.1:9465', metrics_token: t0ken}\n"
        "upstreams:\n  openai: {url: 'https://api.openai.com/', api_key: sk-x,"
        " timeouts: {idle: 250ms, total: 1h30m}}\n"
        "  anthropic: {url: 'https://api.anthropic.com', api_key: k, auth_header: authorization}\n"
        "routes:\n  - {path_prefix: /v1/messages, upstream: anthropic}\n"
        "  - {path_prefix: /, upstream: openai, dialect: openai_chat}\n"
        "trusted_proxies: [10.0.0.0/8, '::1']\nworkers: 3\naccess_log: /var/log/usage.jsonl\n"
        "limits: {header_timeout: 1d, max_request_bytes: 1MB, max_streams: 7}\n"
        "metering: {encodings: {'my-*': cl100k_base}, on_client_disconnect: drain}\n"
        "pricing:\n  models: {my-model: {input: 1, output: 2}, 'my-*': {input: 1, output: 2,"
        " cached_input: 0.5}}\n"
        "  egress: {tiers: [{up_to_gb: 10, usd_per_gb: 0.09}, {usd_per_gb: 0.05}],"
        " directions: [client_in], gb_bytes: 1GB}\n"
        f"tenants:\n  alice: {{keys: ['sha256:{HASH}']}}\n  bob: {{keys: ['{'CD' * 32}']}}\n"
        "tenant_header: X-Tenant\nauth: {require_key: true}\n"
    )
    assert cli.main(["check", "-c", str(path)]) == 0
    printed = capsys.readouterr().out
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert cli.main(["check", "-c", str(again)]) == 0
    assert capsys.readouterr().out == printed
    assert effective_config(load_config(again, {})) == yaml.safe_load(printed)


# ---------------------------------------------------------------------------------------------
# Routes that can never match


def warnings_of(routes: str) -> list[str]:
    text = "upstreams:\n  openai: {url: 'https://api.openai.com'}\nroutes:\n" + routes
    return config_warnings(load_config_text(text, {}))


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("/v1/chat/completions?stream=true", "query"),
        ("/v1/chat/%63ompletions", "/v1/chat/completions"),
        ("/v1/caf\u00e9", "/v1/caf%C3%A9"),
        ("/v1/../admin", "refused"),
        ("/v1%2Fchat", "refused"),
        ("/v1/chat#x", "refused"),
    ],
)
def test_a_route_whose_prefix_no_routed_path_can_hold_is_warned_about(
    prefix: str, why: str
) -> None:
    found = warnings_of(
        f"  - {{path_prefix: {json.dumps(prefix)}, upstream: openai}}\n"
        "  - {path_prefix: /, upstream: openai}\n"
    )
    assert len(found) == 1 and found[0].startswith("routes[0]") and "never matches" in found[0]
    assert why in found[0]


def test_prefixes_as_requests_spell_them_are_not_warned_about() -> None:
    assert (
        warnings_of(
            "  - {path_prefix: /v1/chat/completions, upstream: openai}\n"
            "  - {path_prefix: '/api/v1.2/x_y~z-w/', upstream: openai}\n"
            "  - {path_prefix: '/v1/models%3Alist', upstream: openai}\n"
            "  - {path_prefix: /, upstream: openai}\n"
        )
        == []
    )


# ---------------------------------------------------------------------------------------------
# Options and values as users write them


@pytest.mark.parametrize(
    "argv",
    [
        ["tokenizers", "fetch", "--dir", "d", "--log-level", "debug"],
        ["tokenizers", "--log-level", "debug", "fetch", "--dir", "d"],
        ["hash-key", "k", "--log-level", "debug"],
        ["simulate", "--log-level", "debug"],
        ["--log-level", "error", "demo", "--log-level", "debug"],
    ],
)
def test_log_level_after_any_command(argv: list[str]) -> None:
    assert cli.build_parser().parse_args(argv).log_level == "debug"


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_a_bad_simulator_duration_is_a_usage_error_not_a_traceback(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad, said in (("soon", "expected a duration"), ("-1s", "must be positive")):
        with pytest.raises(SystemExit) as exited:
            cli.build_parser().parse_args([command, f"--ttft={bad}"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "argument --ttft" in err and said in err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, "--listen", "nowhere"])
    assert "argument --listen: expected host:port" in capsys.readouterr().err
    parsed = cli.build_parser().parse_args([command, "--ttft", "0"])
    assert cli._simulator_settings(parsed).ttft == 0.0
    parsed = cli.build_parser().parse_args([command])
    assert cli._simulator_settings(parsed).ttft == 0.2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30 s", 30), ("250 ms", 0.25), ("1h 30m", 5400), ("1 d", 86400), ("1.5h", 5400)],
)
def test_durations_with_spaces_still_load(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1MiB", "-512", " -1 KiB"])
def test_a_negative_size_says_it_must_be_positive_and_names_the_key(bad: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse_size(bad)
    text = (
        "upstreams: {a: {url: 'http://127.0.0.1:1'}}\nroutes: [{path_prefix: /, upstream: a}]\n"
        f"limits: {{max_request_bytes: '{bad}'}}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config_text(text, {})
    assert raised.value.problems == [f"limits.max_request_bytes: must be positive, got {bad!r}"]


# ---------------------------------------------------------------------------------------------
# The record's client fields


def test_forwarded_hops_with_a_port_name_the_client() -> None:
    """As nginx's real_ip (ngx_parse_addr_port): `addr:port` and `[v6]:port` are addresses."""
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)

    def address(forwarded: str) -> str | None:
        return client_address("10.0.0.2", CIMultiDict({"X-Forwarded-For": forwarded}), trusted)

    assert address("198.51.100.7:51234") == "198.51.100.7"
    assert address("[2001:db8::7]:443, 10.0.0.9:80") == "2001:db8::7"
    assert address("[2001:db8::8]") == "2001:db8::8"
    assert address("6.6.6.6, 198.51.100.7:1, 10.0.0.9") == "198.51.100.7"
    assert address("host.example:80, 10.0.0.9") == "10.0.0.9"  # not an address: stop there


def shape(node: object) -> object:
    if isinstance(node, dict):
        return {
            k: shape(v) for k, v in node.items() if k not in ("metering_errors", "tags")
        }  # free-form keys
    return None


async def test_a_real_record_has_exactly_the_documented_example_fields(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, tmp_path: Path
) -> None:
    case = next(c for c in CASES if c.id.startswith("007-openai-chat"))

    async def recorded(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": case.content_type_header})
        await response.prepare(request)
        await response.write(case.body)
        return response

    upstream.handler = recorded
    log = tmp_path / "usage.jsonl"
    running = await make_proxy(access_log=str(log))
    url = f"http://127.0.0.1:{running.proxy_port}{case.path}"
    agent = {"User-Agent": "t/1", "X-User-Id": "u-4821", "X-Tallygate-Tags": "feature=summary"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=case.request, headers=agent) as r,
    ):
        await r.read()
    await records.wait_for(1)
    running.proxy.access_log.close()  # writes out what is queued: the line as a file has it
    [record] = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    doc = (ROOT / "docs" / "usage-record.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", doc, re.S)[1])  # type: ignore[index]
    assert shape(record) == shape(example)
    assert (record["client_address"], record["user_agent"]) == ("127.0.0.1", "t/1")
    assert (record["user"], record["tags"]) == ("u-4821", {"feature": "summary"})


async def test_a_request_tallygate_could_not_read_names_its_peer(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    running = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(b"GARBAGE\r\n\r\n")
    await reader.read()
    writer.close()
    await records.wait_for(1)
    assert (records[0]["rejected_reason"], records[0]["client_address"]) == (
        "bad_request", "127.0.0.1",
    )  # fmt: skip
    assert records[0]["user_agent"] is None
    doc = (ROOT / "docs" / "usage-record.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `client_address`"))
    assert "Null for a request tallygate could not read" not in row
