"""Prometheus metrics, moved by each finished request's usage record and nothing else, so every
figure equals the sum of the records. Labels are bounded: routes, upstreams and tenants come
from configuration; models are capped at `metrics.max_models` distinct values, then `other`.

No I/O: the admin listener exposes the registry.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import fields
from itertools import accumulate
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tallygate import __version__
from tallygate.core.dialects import Usage
from tallygate.core.pricing import COST_KINDS
from tallygate.core.record import DIRECTIONS, UsageRecord
from tallygate.policy.tenants import ANONYMOUS, OTHER

TOKEN_TYPES = tuple(f.name for f in fields(Usage))  # the token buckets of a record
# The codes of tallygate's own refusals (errors.py), exported at 0 from the start.
REJECT_REASONS = (
    "invalid_api_key", "route_not_found", "request_too_large", "not_an_open_proxy",
    "method_not_allowed", "path_refused", "header_timeout", "body_timeout",
    "request_line_too_long", "headers_too_large", "too_many_headers", "bad_request",
    "too_many_connections", "too_many_streams",
)  # fmt: skip
ERROR_REASONS = (
    "unreachable", "connect_timeout", "first_byte_timeout", "idle_timeout", "total_timeout",
    "broken_body", "status_5xx", "status_429", "invalid_response",
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


class _Family:
    """One metric family's values, keyed by label values. Updated on the event loop thread only,
    and read by the scrape on that same thread: no locks, a dict update per change."""

    __slots__ = ("buckets", "help", "kind", "labels", "name", "values")

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], kind: str,
        buckets: tuple[float, ...] = (),
    ) -> None:  # fmt: skip
        self.name, self.help, self.labels, self.kind = name, help, labels, kind
        self.buckets = buckets
        self.values: dict[tuple[str, ...], Any] = {}

    def touch(self, key: tuple[str, ...]) -> None:
        if key not in self.values:
            self.values[key] = [0] * (len(self.buckets) + 1) + [0.0] if self.buckets else 0.0

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def observe(self, key: tuple[str, ...], value: float) -> None:
        """Buckets are kept per bucket (not cumulative) and made cumulative at scrape time."""
        counts = self.values.get(key)
        if counts is None:
            counts = self.values[key] = [0] * (len(self.buckets) + 1) + [0.0]
        counts[bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def family(self) -> Any:
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.help, labels=self.labels)
            for key, value in self.values.items():
                counter.add_metric(key, value)
            return counter
        if self.kind == "gauge":
            gauge = GaugeMetricFamily(self.name, self.help, labels=self.labels)
            for key, value in self.values.items():
                gauge.add_metric(key, value)
            return gauge
        histogram = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        bounds = [*(floatToGoString(b) for b in self.buckets), "+Inf"]  # type: ignore[no-untyped-call]
        for key, counts in self.values.items():
            cumulative = list(accumulate(counts[:-1]))
            histogram.add_metric(key, list(zip(bounds, cumulative, strict=True)), counts[-1])
        return histogram


class Metrics:
    """The metric families, and the one place that moves them."""

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
        f = _Family
        self.requests = f(
            "tallygate_requests",
            "Requests, by how they ended.",
            ("route", "upstream", "model", "tenant", "code", "outcome"),
            "counter",
        )
        self.duration = f(
            "tallygate_request_duration_seconds",
            "From the request's arrival to the end of its response.",
            ("route", "upstream", "model"),
            "histogram",
            DURATION_BUCKETS,
        )
        self.ttft = f(
            "tallygate_time_to_first_token_seconds",
            "From the request's arrival to the first output text sent.",
            ("route", "upstream", "model"),
            "histogram",
            TTFT_BUCKETS,
        )
        self.tpot = f(
            "tallygate_time_per_output_token_seconds",
            "(duration - time to first token) / (output tokens - 1), streams only.",
            ("upstream", "model"),
            "histogram",
            TPOT_BUCKETS,
        )
        self.tokens = f(
            "tallygate_tokens",
            "Tokens, reported by the provider or estimated.",
            ("upstream", "model", "tenant", "type", "source"),
            "counter",
        )
        self.estimate_error = f(
            "tallygate_token_estimate_error_ratio",
            "(estimated - reported) / reported.",
            ("model", "type"),
            "histogram",
            ERROR_RATIO_BUCKETS,
        )
        self.bytes = f(
            "tallygate_bytes",
            "Bytes on the wire, as in the usage records.",
            ("direction", "upstream", "tenant"),
            "counter",
        )
        self.saved = f(
            "tallygate_compression_saved_bytes",
            "Response body bytes gzip kept off the wire.",
            ("tenant",),
            "counter",
        )
        self.cost = f(
            "tallygate_cost_usd",
            "What tokens and egress cost, in USD.",
            ("upstream", "model", "tenant", "kind"),
            "counter",
        )
        self.streams_active = f(
            "tallygate_streams_active", "Responses being relayed now.", ("route",), "gauge"
        )
        self.disconnects = f(
            "tallygate_client_disconnects",
            "Clients that left before their response ended, or were cut off for not reading.",
            ("route",),
            "counter",
        )
        self.upstream_errors = f(
            "tallygate_upstream_errors",
            "Upstream failures, by reason.",
            ("upstream", "reason"),
            "counter",
        )
        self.metering_errors = f(
            "tallygate_metering_errors",
            "Metering problems (the relay went on), by stage.",
            ("stage",),
            "counter",
        )
        self.undelivered = f(
            "tallygate_undelivered_output_tokens",
            "Output tokens that never reached a client that left mid-stream.",
            ("upstream", "model", "tenant"),
            "counter",
        )
        self.rejected = f(
            "tallygate_requests_rejected",
            "Requests tallygate answered itself without asking an upstream, by reason.",
            ("reason",),
            "counter",
        )
        self.access_log_failures = f(
            "tallygate_access_log_failures",
            "Usage records the access log could not write (the relay went on).",
            (),
            "counter",
        )
        self.access_log_failures.values[()] = 0.0
        self._log_failures: Callable[[], int] = lambda: 0
        self.unpriced = f(
            "tallygate_unpriced_tokens",
            "Tokens of models without a price (costed at 0).",
            ("model",),
            "counter",
        )
        build = f("tallygate_build_info", "tallygate's version.", ("version",), "gauge")
        build.values[(__version__,)] = 1.0
        config = self._config_info = f(
            "tallygate_config_info", "A hash of the effective configuration.", ("hash",), "gauge"
        )
        config.values[(config_hash,)] = 1.0
        self.families = [
            self.requests, self.duration, self.ttft, self.tpot, self.tokens, self.estimate_error,
            self.bytes, self.saved, self.cost, self.streams_active, self.disconnects,
            self.upstream_errors, self.metering_errors, self.undelivered, self.unpriced,
            self.rejected, self.access_log_failures, build, config,
        ]  # fmt: skip
        self._export_zeros(list(routes), list(upstreams))
        registry.register(self)

    def reconfigure(
        self, routes: Iterable[str], upstreams: Iterable[str], tenants: Iterable[str],
        max_models: int, config_hash: str,
    ) -> None:  # fmt: skip
        """After a reload: new label values are exported at 0; the series of removed routes,
        upstreams and tenants stay, as counters must not go back."""
        self._tenants = frozenset(tenants)
        self._max_models = max_models
        self._config_info.values = {(config_hash,): 1.0}
        self._export_zeros(list(routes), list(upstreams))

    def watch_access_log(self, failures: Callable[[], int]) -> None:
        """The one metric no record can move: records lost by a failing sink, read at scrape."""
        self._log_failures = failures

    def _refresh(self) -> None:
        self.access_log_failures.values[()] = float(self._log_failures())

    def collect(self) -> Iterable[Any]:
        """For prometheus_client's exposition (the scrape)."""
        self._refresh()
        for family in self.families:
            yield family.family()

    def snapshot(self) -> bytes:
        """Every value, for the master of several workers to add up."""
        self._refresh()
        return orjson.dumps(
            {f.name: [[list(key), value] for key, value in f.values.items()] for f in self.families}
        )

    def load(self, snapshots: Iterable[bytes]) -> None:
        """Replace the values with the sum of the workers' snapshots. Counters, histograms and the
        active-streams gauge add up; the `_info` gauges do not (each worker says 1)."""
        families = {f.name: f for f in self.families}
        for family in self.families:
            if not family.name.endswith("_info"):
                family.values = {}
        for snapshot in snapshots:
            for name, entries in orjson.loads(snapshot).items():
                found = families.get(name)
                if found is None or name.endswith("_info"):
                    continue
                values = found.values
                for key_list, value in entries:
                    key = tuple(key_list)
                    if found.buckets:
                        total = values.get(key)
                        values[key] = (
                            value
                            if total is None
                            else [a + b for a, b in zip(total, value, strict=True)]
                        )
                    else:
                        values[key] = values.get(key, 0.0) + value

    def _export_zeros(self, routes: list[str], upstreams: list[str]) -> None:
        """Known label combinations exist from the start, so rates and alerts see 0, not nothing."""
        tenants = [*self._tenants, ANONYMOUS]
        for route in routes:
            self.streams_active.touch((route,))
            self.disconnects.touch((route,))
        for upstream in upstreams:
            for reason in ERROR_REASONS:
                self.upstream_errors.touch((upstream, reason))
            for tenant in tenants:
                for direction in DIRECTIONS:
                    self.bytes.touch((direction, upstream, tenant))
        for tenant in tenants:
            self.saved.touch((tenant,))
        for stage in METERING_STAGES:
            self.metering_errors.touch((stage,))
        for reason in REJECT_REASONS:
            self.rejected.touch((reason,))

    def model_label(self, name: str | None, claim: bool = True) -> str:
        """The pricing key or model name, bounded to `max_models` distinct values. A name not
        seen yet takes a slot only when `claim`: a model the price table knows, or one the
        upstream did not refuse as a client error. Names from refused requests (any string a
        client sends, answered 404) would otherwise take the slots, and the real models would be
        `other` until a restart."""
        if not name:
            return NO_MODEL
        if name in self._models:
            return name
        if claim and len(self._models) < self._max_models:
            self._models.add(name)
            return name
        return OTHER

    def tenant_label(self, tenant: str) -> str:
        return tenant if tenant in self._tenants or tenant == ANONYMOUS else OTHER

    def stream_started(self, route: str) -> None:
        self.streams_active.inc((route,))

    def stream_ended(self, route: str) -> None:
        self.streams_active.inc((route,), -1.0)

    def observe(self, record: UsageRecord) -> None:
        """Move every metric by what one usage record says."""
        route, upstream = record.route, record.upstream
        # A client error (400, 404, 422: a model that does not exist, say) proves no model.
        status = record.status
        refused = (400 <= status < 500 and status != 429) or status == 0
        model = self.model_label(
            record.priced_as or record.model, record.priced_as is not None or not refused
        )
        tenant = self.tenant_label(record.tenant)
        outcome = record.outcome
        self.requests.inc((route, upstream, model, tenant, str(status), outcome))
        timings = record.timings
        where = (route, upstream, model)
        self.duration.observe(where, timings.duration_s)
        if timings.ttft_s is not None:
            self.ttft.observe(where, timings.ttft_s)
        tokens = record.tokens
        source = record.tokens_source
        if source != "none":
            for kind in TOKEN_TYPES:
                value = getattr(tokens, kind)
                if value:
                    kind_source = "estimated" if source == "estimated" or (
                        source == "mixed" and kind in ("output", "reasoning")
                    ) else "reported"  # fmt: skip
                    self.tokens.inc((upstream, model, tenant, kind, kind_source), value)
        if record.stream and timings.ttft_s is not None and tokens.output > 1:
            per_token = (timings.duration_s - timings.ttft_s) / (tokens.output - 1)
            self.tpot.observe((upstream, model), per_token)
        if source == "reported":
            estimated = record.estimated
            for kind, guess, counted in (
                ("input", estimated.input, tokens.input),
                ("output", estimated.output, tokens.output),
            ):
                if guess is not None and counted:
                    self.estimate_error.observe((model, kind), (guess - counted) / counted)
        wire = record.bytes
        for direction, value in (
            ("client_in", wire.client_in), ("client_out", wire.client_out),
            ("upstream_out", wire.upstream_out), ("upstream_in", wire.upstream_in),
        ):  # fmt: skip
            if value:
                self.bytes.inc((direction, upstream, tenant), value)
        if record.compression_saved_bytes:
            self.saved.inc((tenant,), record.compression_saved_bytes)
        costs = record.cost_usd
        for kind in COST_KINDS:
            if costs[kind]:
                self.cost.inc((upstream, model, tenant, kind), costs[kind])
        if record.unpriced_tokens:
            self.unpriced.inc((model,), record.unpriced_tokens)
        if record.rejected_reason is not None:
            self.rejected.inc((record.rejected_reason,))
        if outcome in ("client_disconnect", "client_timeout"):
            self.disconnects.inc((route,))
            delivered = record.delivered_output_tokens
            if delivered is not None and tokens.output > delivered:
                self.undelivered.inc((upstream, model, tenant), tokens.output - delivered)
        if record.error_reason is not None:
            self.upstream_errors.inc((upstream, record.error_reason))
        for stage, count in record.metering_errors.items():
            self.metering_errors.inc((stage,), count)


def config_hash(effective: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(effective, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
