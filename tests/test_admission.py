"""Admission as a pure decision: fed what a request's head says, it answers without I/O."""

from __future__ import annotations

import pytest

from tallygate.config import Config
from tallygate.policy.admission import Admission, Admitted, Preflight, Refused
from tallygate.policy.routing import Router
from tallygate.policy.tenants import Tenants, hash_key

from conftest import config_for

KEY = "tg-test-key"


def admission(**overrides: object) -> Admission:
    config: Config = config_for(
        "http://127.0.0.1:9",
        routes=[
            {"path_prefix": "/v1/", "upstream": "main"},
            {"path_prefix": "/claude/", "upstream": "main", "dialect": "anthropic_messages"},
        ],
        tenants={"acme": {"keys": [hash_key(KEY)]}}, auth={"require_key": True},
        limits={"max_request_bytes": 1000, "max_streams": 2},
        cors={"allow_origins": ["https://app.example"]},
        **overrides,
    )  # fmt: skip
    tenants = Tenants({n: t.keys for n, t in config.tenants.items()}, None, config.require_key)
    return Admission(config, Router(config.routes), tenants)


def decide(path: str = "/v1/chat/completions", method: str = "POST", key: str | None = KEY,
           length: int | None = 10, active: int = 1, **headers: str) -> object:  # fmt: skip
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return admission().decide(method, path, path, headers, "127.0.0.1", length, False, active)


def test_an_admitted_request_carries_its_route_tenant_and_dialect() -> None:
    decision = decide()
    assert isinstance(decision.verdict, Admitted)  # type: ignore[attr-defined]
    verdict = decision.verdict  # type: ignore[attr-defined]
    assert verdict.route.path_prefix == "/v1/" and verdict.identity.tenant == "acme"
    assert verdict.spoken == "openai_chat" and verdict.target == "/v1/chat/completions"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"active": 3}, 503, "too_many_streams"),
        ({"method": "CONNECT"}, 405, "method_not_allowed"),
        ({"path": "/v1/../admin"}, 400, "path_refused"),
        ({"key": None}, 401, "invalid_api_key"),
        ({"key": None, "path": "/nowhere"}, 401, "invalid_api_key"),  # no key: no route news
        ({"path": "/nowhere"}, 404, "route_not_found"),
        ({"length": 1001}, 413, "request_too_large"),
    ],
)
def test_refusals_in_their_order(kwargs: dict[str, object], status: int, code: str) -> None:
    verdict = decide(**kwargs).verdict  # type: ignore[arg-type, attr-defined]
    assert isinstance(verdict, Refused)
    assert (verdict.error.status, verdict.error.code) == (status, code)


def test_a_preflight_is_answered_without_a_key_and_errors_follow_the_route() -> None:
    preflight = decide(method="OPTIONS", key=None, Origin="https://app.example",
                       **{"Access-Control-Request-Method": "POST"})  # fmt: skip
    assert isinstance(preflight.verdict, Preflight)  # type: ignore[attr-defined]
    assert preflight.cors[1] == "https://app.example"  # type: ignore[attr-defined]
    refused = decide(path="/claude/send", key=None)
    assert refused.family == "anthropic"  # type: ignore[attr-defined]
