"""A model without a price is loud: a log warning once per model, an alert, a dashboard panel;
and `tallygate check` says when the shipped price table is old."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from tallygate import cli
from tallygate.config.prices import default_price_table

from conftest import ROOT, FakeUpstream, ProxyFactory, RecordLog

RULES_FILE = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMTOOL = shutil.which("promtool")


async def answer_as_the_model_asked(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    return web.json_response({
        "model": body["model"], "usage": {"prompt_tokens": 21, "completion_tokens": 5},
        "choices": [{"index": 0, "message": {"content": "Hello."}, "finish_reason": "stop"}],
    })  # fmt: skip


async def test_an_unpriced_model_is_logged_once_per_process(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    records: RecordLog,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tallygate.proxy.relay")
    upstream.handler = answer_as_the_model_asked
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"

    async def ask(model: str) -> None:
        message = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
        async with client.post(url, json=message) as response:
            await response.read()

    for model in ("brand-new-model", "brand-new-model", "gpt-4o-mini", "other-new-model"):
        await ask(model)
    await records.wait_for(4)
    running.reload(running.config, running.proxy.tokenizers)  # SIGHUP's path: same process
    await ask("brand-new-model")
    await records.wait_for(5)

    warned = [r.getMessage() for r in caplog.records if "has no price" in r.getMessage()]
    assert len(warned) == 2, warned
    assert warned[0].startswith("model 'brand-new-model' has no price")
    assert warned[1].startswith("model 'other-new-model' has no price")
    assert all("pricing.models" in message for message in warned)
    unpriced = [r for r in records if r["model"] != "gpt-4o-mini"]
    assert [r["priced_as"] for r in unpriced] == [None] * 4
    assert all(r["unpriced_tokens"] == 26 for r in unpriced)


def test_check_warns_when_the_price_table_is_older_than_90_days(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dated = date.fromisoformat(default_price_table().date)
    cli._warn_price_table_age(dated + timedelta(days=91))
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: the shipped price table is dated {dated}, 91 days ago")
    cli._warn_price_table_age(dated + timedelta(days=90))
    assert capsys.readouterr().err == ""


def test_check_takes_today_from_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[date] = []
    monkeypatch.setattr(cli, "_warn_price_table_age", seen.append)
    assert cli.main(["check", "-c", str(ROOT / "config.example.yaml")]) == 0
    assert len(seen) == 1 and abs((seen[0] - datetime.now(UTC).date()).days) <= 1


def test_the_dashboard_shows_unpriced_tokens() -> None:
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "tallygate.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("tallygate_unpriced_tokens_total" in expr for expr in exprs)


@pytest.mark.skipif(PROMTOOL is None, reason="prometheus is not installed")
def test_the_unpriced_tokens_alert_fires(tmp_path: Path) -> None:
    """promtool's rule unit test: the shipped rules file, a model that starts getting unpriced
    tokens at minute 10, and one that never does."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    alert = next(
        rule
        for group in rules["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "TallygateUnpricedTokens"
    )
    assert "tallygate_unpriced_tokens_total" in alert["expr"]
    fired = [{
        "exp_labels": {"severity": "warning", "model": "brand-new-model"},
        "exp_annotations": {"summary": "Model brand-new-model has no price: its tokens are "
                                       "costed at 0 (set pricing.models)"},
    }]  # fmt: skip
    test = {
        "rule_files": [str(RULES_FILE)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'tallygate_unpriced_tokens_total{model="brand-new-model"}',
                 "values": "0x10 26+26x30"},
                {"series": 'tallygate_unpriced_tokens_total{model="priced-later"}',
                 "values": "0x40"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "TallygateUnpricedTokens", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "TallygateUnpricedTokens", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "TallygateUnpricedTokens", "exp_alerts": fired},
            ],
        }],
    }  # fmt: skip
    (tmp_path / "unpriced_test.yml").write_text(yaml.safe_dump(test))
    done = subprocess.run(
        [PROMTOOL or "promtool", "test", "rules", "unpriced_test.yml"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
