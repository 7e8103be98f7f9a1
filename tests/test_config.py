"""Configuration: units, interpolation, validation messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tallygate.config import (
    ConfigError,
    Listen,
    effective_config,
    load_config,
    load_config_text,
    parse_duration,
    parse_listen,
    parse_size,
)

from conftest import ROOT

MINIMAL = "upstreams:\n  openai: {url: 'https://api.openai.com'}\nroutes:\n  - {path_prefix: /, upstream: openai}\n"


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config_text(text, env or {})
    return raised.value.problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h", 3600), (12, 12), (0.5, 0.5), ("2", 2)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512KiB", 512 * 1024),
        ("32MiB", 32 * 1024**2),
        ("1GiB", 1024**3),
        (4096, 4096),
        ("1MB", 10**6),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["30 parsecs", "-1s", 0, True, "", "1.5KiB"])
def test_bad_units_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad) if not str(bad).endswith("KiB") else parse_size(bad)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8080") == Listen("127.0.0.1", 8080)
    assert parse_listen("[::1]:9464") == Listen("::1", 9464)
    assert parse_listen(":8080") == Listen("0.0.0.0", 8080)
    assert str(Listen("::1", 1)) == "[::1]:1"
    with pytest.raises(ValueError):
        parse_listen("8080")


def test_defaults() -> None:
    config = load_config_text(MINIMAL, {})
    assert config.listen == Listen("127.0.0.1", 8080)
    assert config.admin.listen == Listen("127.0.0.1", 9464)
    assert config.limits.max_request_bytes == 32 * 1024**2
    assert config.shutdown_grace == 30
    assert config.compression.gzip and config.compression.level == 6
    assert config.upstreams["openai"].timeouts.first_byte == 120
    assert config.upstreams["openai"].auth_header == "authorization"


def test_interpolation() -> None:
    text = MINIMAL.replace(
        "'https://api.openai.com'", "'${BASE:-https://api.openai.com}', api_key: '${KEY}'"
    )
    config = load_config_text(text + "shutdown_grace: ${GRACE:-5s}\n", {"KEY": "sk-1"})
    assert config.upstreams["openai"].api_key == "sk-1"
    assert config.upstreams["openai"].url == "https://api.openai.com"
    assert config.shutdown_grace == 5
    assert problems(text, {}) == [
        "upstreams.openai.api_key: environment variable KEY is not set (write ${KEY:-} to make it optional)"
    ]
    # An empty key means no key: the client's own credential goes through.
    assert load_config_text(text, {"KEY": ""}).upstreams["openai"].api_key is None


def test_every_problem_is_reported_with_its_key() -> None:
    text = MINIMAL + (
        "listen: nowhere\nadmin: {listen: '127.0.0.1:9464', lisen: x}\n"
        "compression: {level: 11, window_bits: 8}\nlimits: {max_request_bytes: lots}\n"
        "upstreams:\n  a: {url: 'https://x', timeouts: {idle: soon}}\n"
        "routes:\n  - {upstream: a, path_prefix: /, dialekt: openai}\n"
    )
    assert sorted(problems(text)) == sorted(
        [
            "admin.lisen: unknown key (did you mean 'listen'?)",
            "upstreams.a.timeouts.idle: expected a duration like 250ms, 30s, 5m or 2h30m, got 'soon'",
            "routes[0].dialekt: unknown key (did you mean 'dialect'?)",
            "listen: expected host:port, got 'nowhere'",
            "compression.level: must be from 1 to 9, got 11",
            "compression.window_bits: must be from 9 to 15, got 8",
            "limits.max_request_bytes: expected a size like 512KiB or 32MiB, got 'lots'",
        ]
    )


def test_structure_problems() -> None:
    assert problems("routes: []\n") == [
        "upstreams: at least one upstream is required",
        "routes: at least one route is required (a list)",
    ]
    assert problems("- a\n- b\n")[0] == "config: expected a mapping, got a list"
    assert problems("a: [\n")[0].startswith("config:2:1: not valid YAML")
    assert problems(MINIMAL + "admin: {listen: '127.0.0.1:8080'}\n") == [
        "admin.listen: must differ from listen (127.0.0.1:8080)"
    ]


def test_example_config_is_valid_and_documented() -> None:
    config = load_config(ROOT / "config.example.yaml", env={})
    doc = (ROOT / "docs" / "configuration.md").read_text()
    effective = effective_config(config)

    def keys(node: object, prefix: str = "") -> list[str]:
        if not isinstance(node, dict):
            return [prefix]
        out = []
        for key, value in node.items():
            if prefix == "upstreams":
                out += keys(value, "upstreams.<name>")
            else:
                out += keys(value, f"{prefix}.{key}" if prefix else key)
        return out

    for key in set(keys(effective)) - {"routes", "trusted_proxies"}:
        assert f"`{key}`" in doc, f"{key} is not documented in docs/configuration.md"
    for key in ("routes[].path_prefix", "routes[].upstream", "trusted_proxies"):
        assert f"`{key}`" in doc


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_typed_keys_take_values_from_the_environment() -> None:
    text = MINIMAL + "workers: ${W}\ncompression: {gzip: '${G}', level: '${L}'}\n"
    config = load_config_text(text, {"W": "2", "G": "false", "L": "9"})
    assert (
        config.workers == 2 and config.compression.gzip is False and config.compression.level == 9
    )
    assert sorted(problems(text, {"W": "two", "G": "maybe", "L": "9"})) == [
        "compression.gzip: expected true or false, got 'maybe'",
        "workers: expected a whole number from 1 to 256, got 'two'",
    ]
