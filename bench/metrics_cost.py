"""What moving the metrics costs per request (the hot path's share), in microseconds.

python bench/metrics_cost.py
"""

from __future__ import annotations

import timeit

from prometheus_client import CollectorRegistry

from tallygate.metrics import Metrics

RECORD = {
    "route": "/", "upstream": "main", "tenant": "acme", "outcome": "ok", "status": 200, "stream": True,
    "timings": {"duration_s": 0.5, "ttft_s": 0.1},
    "tokens": {"input": 100, "output": 60, "cached_input": 0, "cache_write_input": 0, "reasoning": 0},
    "tokens_source": "reported", "estimated": {"input": 98, "output": 60},
    "bytes": {"client_in": 500, "client_out": 3000, "upstream_out": 600, "upstream_in": 20000},
    "compression_saved_bytes": 15000,
    "cost_usd": {"input": 1e-5, "output": 2e-5, "cached_input": 0, "cache_write_input": 0, "egress": 1e-6, "total": 3e-5},
    "unpriced_tokens": 0, "metering_errors": {}, "delivered_output_tokens": None,
}  # fmt: skip


def main() -> None:
    metrics = Metrics(CollectorRegistry(), ["/"], ["main"], ["acme"], 50, "bench")
    runs = 100_000
    seconds = min(
        timeit.repeat(lambda: metrics.observe(RECORD, "gpt-4o", None), number=runs, repeat=5)
    )
    print(f"metrics per request: {seconds / runs * 1e6:.1f} us ({runs} requests, best of 5)")


if __name__ == "__main__":
    main()
