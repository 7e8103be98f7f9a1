"""What moving the metrics costs per request (the hot path's share), in microseconds.

python bench/metrics_cost.py
"""

from __future__ import annotations

import timeit

from prometheus_client import CollectorRegistry

from tallygate.core.dialects import Usage
from tallygate.core.record import Estimated, Timings, Traffic, UsageRecord
from tallygate.observe.metrics import Metrics

RECORD = UsageRecord(
    ts=0.0, request_id="tg-1", client_request_id=None, upstream_request_id=None,
    client_address=None, user_agent=None, route="/", upstream="main", dialect="openai_chat",
    method="POST", path="/v1/chat/completions", status=200, outcome="ok", stream=True,
    model="gpt-4o", tenant="acme", tokens=Usage(100, 60), tokens_source="reported",
    estimated=Estimated(98, 60, True), delivered_output_tokens=None, usage_requested=True,
    finish_reason="stop", rejected_reason=None, upstream_errors=(), metering_errors={},
    bytes=Traffic(500, 3000, 600, 20000), client_out_uncompressed=18000,
    compression_saved_bytes=15000, encoding="gzip",
    cost_usd={"input": 1e-5, "output": 2e-5, "cached_input": 0, "cache_write_input": 0, "egress": 1e-6, "total": 3e-5},
    priced_as="gpt-4o", unpriced_tokens=0, timings=Timings(0.05, 0.1, 0.5),
)  # fmt: skip


def main() -> None:
    metrics = Metrics(CollectorRegistry(), ["/"], ["main"], ["acme"], 50, "bench")
    runs = 100_000
    seconds = min(timeit.repeat(lambda: metrics.observe(RECORD), number=runs, repeat=5))
    print(f"metrics per request: {seconds / runs * 1e6:.1f} us ({runs} requests, best of 5)")


if __name__ == "__main__":
    main()
