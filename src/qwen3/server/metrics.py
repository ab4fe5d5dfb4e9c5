"""Prometheus metrics for `GET /metrics`, with vLLM's names under the `qwen3:` prefix.

The engine's state (running and waiting requests, KV-cache use, token totals) is read from
`AsyncLLM.stats()` when the page is scraped (as of the engine loop's last pass, a step or an abort ago at most);
the latency histograms are observed by the server as tokens stream out. Each app has its own registry (no
process-global state).

The histograms are observed for every streamed increment, so they are plain counters (a bisect and an add, about
0.3 us) rather than prometheus_client's `Histogram` (a lock and a linear search over the buckets, about 3.5 us):
they are observed and scraped on the server's one event-loop thread, so they need no lock.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], Any], model_name: str) -> None:
        self.stats, self.model_name = stats, model_name

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("qwen3:num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("qwen3:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("qwen3:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage)
        yield counter("qwen3:num_preemptions", "Requests preempted (recomputed) so far.", s.num_preemptions)
        yield counter("qwen3:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total)
        yield counter("qwen3:generation_tokens", "Tokens generated.", s.generation_tokens_total)


class LatencyHistogram(Collector):
    """A Prometheus histogram with one label value, observed from one thread (see the module docstring).

    `values` holds, per row, the count of each bucket, the count above every bound (le="+Inf") and the sum: one
    row of a plain list, or, behind several HTTP processes (server/front_ends.py), shared memory with a row per
    process, each process adding to its own row and a scrape summing them all."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], model_name: str,
                 values: Any = None, row: int = 0) -> None:  # fmt: skip
        self.name, self.doc, self.model_name = name, doc, model_name
        self.bounds = list(buckets)
        self.width = self.row_width(buckets)
        self.values = [0.0] * self.width if values is None else values
        self.offset = row * self.width

    @staticmethod
    def row_width(buckets: Sequence[float]) -> int:
        """Values per row: a count per bucket, the count above every bound, the sum."""
        return len(buckets) + 2

    def observe(self, value: float) -> None:
        values, offset = self.values, self.offset
        values[offset + bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with value <= le
        values[offset + self.width - 1] += value

    def collect(self) -> Iterator[Metric]:
        width = self.width
        rows = [self.values[i : i + width] for i in range(0, len(self.values), width)]
        totals = [sum(column) for column in zip(*rows, strict=True)]
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, float("inf")], totals[:-1], strict=True):
            cumulative += int(count)
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([self.model_name], buckets, totals[-1])
        yield family


HISTOGRAMS = (  # (name, documentation, buckets)
    ("qwen3:time_to_first_token_seconds", "Time from request arrival to its first token.", _TTFT_BUCKETS),
    ("qwen3:inter_token_latency_seconds", "Time between two streamed increments of a request.", _ITL_BUCKETS),
    ("qwen3:e2e_request_latency_seconds", "Time from request arrival to its last token.", _TTFT_BUCKETS),
)


def shared_histograms(processes: int) -> list[Any]:
    """Shared memory for HISTOGRAMS behind `processes` HTTP processes (a row each), to hand to each `Metrics`."""
    from multiprocessing import get_context

    context = get_context("spawn")
    return [context.RawArray("d", processes * LatencyHistogram.row_width(buckets)) for _, _, buckets in HISTOGRAMS]


class Metrics:
    """The registry of one server: engine gauges and counters plus latency histograms. `shared`: (the arrays of
    `shared_histograms`, this process's row), behind several HTTP processes."""

    def __init__(self, stats: Callable[[], Any], model_name: str, shared: tuple[list[Any], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        self.model_name = model_name
        arrays, row = shared if shared is not None else ([None] * len(HISTOGRAMS), 0)
        self.time_to_first_token, self.inter_token_latency, self.e2e_latency = histograms = [
            LatencyHistogram(name, doc, buckets, model_name, values, row)
            for (name, doc, buckets), values in zip(HISTOGRAMS, arrays, strict=True)
        ]
        for histogram in histograms:
            self.registry.register(histogram)

    def render(self) -> bytes:
        return generate_latest(self.registry)
