"""Prometheus metrics, moved by each finished request's usage record and nothing else, so every
figure equals the sum of the records. Labels are bounded: routes, upstreams and tenants come
from configuration; models are capped at `metrics.max_models` distinct values, then `other`.

No I/O: the admin listener exposes the registry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .pricing import COST_KINDS
from .tenants import ANONYMOUS, OTHER

TOKEN_TYPES = ("input", "output", "cached_input", "cache_write_input", "reasoning")
DIRECTIONS = ("client_in", "client_out", "upstream_out", "upstream_in")
OUTCOMES = ("ok", "client_disconnect", "upstream_error", "timeout", "rejected", "shutdown")
ERROR_REASONS = (
    "unreachable", "connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout",
    "broken_body", "status_5xx",
)  # fmt: skip
METERING_STAGES = ("request", "prompt", "framing", "dialect", "record")

# Up to the default total timeout (900 s).
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    900,
)
# 5 ms to 60 s, fine below a second where time to first token lives.
TTFT_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    10,
    20,
    30,
    60,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
ERROR_RATIO_BUCKETS = (
    -1,
    -0.5,
    -0.25,
    -0.1,
    -0.05,
    -0.02,
    -0.01,
    0,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2,
)

NO_MODEL = "none"


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        routes: Iterable[str],
        upstreams: Iterable[str],
        tenants: Iterable[str],
        max_models: int,
        config_hash: str,
    ) -> None:
        self.registry = registry
        self._max_models = max_models
        self._models: set[str] = set()
        self._tenants = frozenset(tenants)
        self._children: dict[tuple[Any, ...], Any] = {}
        r = registry
        self.requests = Counter(
            "tallygate_requests", "Requests, by how they ended.",
            ["route", "upstream", "model", "tenant", "code", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "tallygate_request_duration_seconds",
            "From the request's arrival to the end of its response.",
            ["route", "upstream", "model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tallygate_time_to_first_token_seconds",
            "From the request's arrival to the first output text sent.",
            ["route", "upstream", "model"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "tallygate_time_per_output_token_seconds",
            "(duration - time to first token) / (output tokens - 1), streams only.",
            ["upstream", "model"], buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tallygate_tokens", "Tokens, reported by the provider or estimated by tallygate.",
            ["upstream", "model", "tenant", "type", "source"], registry=r,
        )  # fmt: skip
        self.estimate_error = Histogram(
            "tallygate_token_estimate_error_ratio", "(estimated - reported) / reported.",
            ["model", "type"], buckets=ERROR_RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "tallygate_bytes", "Bytes on the wire, as in the usage records.",
            ["direction", "upstream", "tenant"], registry=r,
        )  # fmt: skip
        self.saved = Counter(
            "tallygate_compression_saved_bytes", "Response body bytes gzip kept off the wire.",
            ["tenant"], registry=r,
        )  # fmt: skip
        self.cost = Counter(
            "tallygate_cost_usd", "What tokens and egress cost, in USD.",
            ["upstream", "model", "tenant", "kind"], registry=r,
        )  # fmt: skip
        self.streams_active = Gauge(
            "tallygate_streams_active", "Responses being relayed now.", ["route"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.disconnects = Counter(
            "tallygate_client_disconnects", "Clients that left before their response ended.",
            ["route"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "tallygate_upstream_errors", "Upstream failures, by reason.",
            ["upstream", "reason"], registry=r,
        )  # fmt: skip
        self.metering_errors = Counter(
            "tallygate_metering_errors", "Metering problems (the relay went on), by stage.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.unpriced = Counter(
            "tallygate_unpriced_tokens", "Tokens of models without a price (costed at 0).",
            ["model"], registry=r,
        )  # fmt: skip
        Gauge("tallygate_build_info", "tallygate's version.", ["version"], registry=r,
              multiprocess_mode="max").labels(__version__).set(1)  # fmt: skip
        Gauge("tallygate_config_info", "A hash of the effective configuration.", ["hash"],
              registry=r, multiprocess_mode="max").labels(config_hash).set(1)  # fmt: skip
        self._export_zeros(list(routes), list(upstreams))

    def _export_zeros(self, routes: list[str], upstreams: list[str]) -> None:
        """Known label combinations exist from the start, so rates and alerts see 0, not nothing."""
        tenants = [*self._tenants, ANONYMOUS]
        for route in routes:
            self.streams_active.labels(route)
            self.disconnects.labels(route)
        for upstream in upstreams:
            for reason in ERROR_REASONS:
                self.upstream_errors.labels(upstream, reason)
            for tenant in tenants:
                for direction in DIRECTIONS:
                    self.bytes.labels(direction, upstream, tenant)
        for tenant in tenants:
            self.saved.labels(tenant)
        for stage in METERING_STAGES:
            self.metering_errors.labels(stage)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, name: str | None) -> str:
        """The pricing key or model name, bounded to `max_models` distinct values."""
        if not name:
            return NO_MODEL
        if name in self._models:
            return name
        if len(self._models) < self._max_models:
            self._models.add(name)
            return name
        return OTHER

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self._tenants or tenant == ANONYMOUS else OTHER

    def stream_started(self, route: str) -> None:
        self._child(self.streams_active, route).inc()

    def stream_ended(self, route: str) -> None:
        self._child(self.streams_active, route).dec()

    def observe(
        self, record: dict[str, Any], model_key: str | None, error_reason: str | None
    ) -> None:
        """Move every metric by what one usage record says."""
        child = self._child
        route, upstream = record["route"], record["upstream"]
        model = self.model_label(model_key)
        tenant = self.tenant_label(record["tenant"])
        outcome = record["outcome"]
        child(self.requests, route, upstream, model, tenant, str(record["status"]), outcome).inc()
        timings = record["timings"]
        child(self.duration, route, upstream, model).observe(timings["duration_s"])
        if timings["ttft_s"] is not None:
            child(self.ttft, route, upstream, model).observe(timings["ttft_s"])
        tokens = record["tokens"]
        source = record["tokens_source"]
        if source != "none":
            for kind in TOKEN_TYPES:
                value = tokens[kind]
                if value:
                    kind_source = "estimated" if source == "estimated" or (
                        source == "mixed" and kind in ("output", "reasoning")
                    ) else "reported"  # fmt: skip
                    child(self.tokens, upstream, model, tenant, kind, kind_source).inc(value)
        if record["stream"] and timings["ttft_s"] is not None and tokens["output"] > 1:
            per_token = (timings["duration_s"] - timings["ttft_s"]) / (tokens["output"] - 1)
            child(self.tpot, upstream, model).observe(per_token)
        if source == "reported":
            estimated = record["estimated"]
            for kind in ("input", "output"):
                if estimated[kind] is not None and tokens[kind]:
                    ratio = (estimated[kind] - tokens[kind]) / tokens[kind]
                    child(self.estimate_error, model, kind).observe(ratio)
        for direction, value in record["bytes"].items():
            if value:
                child(self.bytes, direction, upstream, tenant).inc(value)
        if record["compression_saved_bytes"]:
            child(self.saved, tenant).inc(record["compression_saved_bytes"])
        for kind in COST_KINDS:
            value = record["cost_usd"][kind]
            if value:
                child(self.cost, upstream, model, tenant, kind).inc(value)
        if record["unpriced_tokens"]:
            child(self.unpriced, model).inc(record["unpriced_tokens"])
        if outcome == "client_disconnect":
            child(self.disconnects, route).inc()
        if error_reason is not None:
            child(self.upstream_errors, upstream, error_reason).inc()
        for stage, count in record["metering_errors"].items():
            child(self.metering_errors, stage).inc(count)


def config_hash(effective: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(effective, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
