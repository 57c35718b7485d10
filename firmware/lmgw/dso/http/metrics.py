"""Prometheus metrics of one node (``/metrics``), fed by the server's observer and the API.

One registry per node (not prometheus-client's global one): several nodes may run in one process
(tests, benchmarks).  In a cluster every node reports its own gateways and calls; sum over nodes.
Label values are bounded: a method name outside ``METHOD`` or past ``MAX_METHODS`` distinct names is
counted as ``other``, so an operator typing method names cannot grow the registry without end.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

METHOD = re.compile(r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}$")
MAX_METHODS = 64
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EXPIRY_WINDOWS = (7, 30)
"""Days: how many connected gateways' certificates end within each."""

disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` series: a restart is visible in process metrics already


class _ExpiryCollector(Collector):
    def __init__(self, metrics: ApiMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        now = self.metrics.now()
        ends = list(self.metrics.not_after.values())
        horizon = GaugeMetricFamily(
            "lmgw_dso_certificate_expiry_horizon_seconds",
            "Seconds until the soonest end of a certificate a gateway connected to this node with")
        if ends:
            horizon.add_metric([], (min(ends) - now).total_seconds())
        yield horizon
        expiring = GaugeMetricFamily("lmgw_dso_certificates_expiring",
                                     "Connected gateways whose certificate ends within the window", labels=["within"])
        for days in EXPIRY_WINDOWS:
            limit = now + timedelta(days=days)
            expiring.add_metric([f"{days}d"], sum(1 for end in ends if end <= limit))
        yield expiring


class _CallCollector(Collector):
    """``lmgw_dso_calls`` (counter) and ``lmgw_dso_call_seconds`` (histogram), kept as plain numbers and rendered
    at a scrape: prometheus-client's Counter and Histogram look up, check and lock on every call, 5% of the
    DSO's CPU per call in `make bench` (docs/performance.md).  The server's event loop is the only writer."""

    BOUNDS = [floatToGoString(b) for b in CALL_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]  # as Histogram writes them

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}
        self.seconds: dict[str, list[float]] = {}
        """Per method label: the calls in each bucket of ``CALL_BUCKETS`` and +Inf (not cumulative), then their sum."""

    def add(self, label: str, outcome: str, seconds: float) -> None:
        key = (label, outcome)
        self.calls[key] = self.calls.get(key, 0) + 1
        counts = self.seconds.get(label)
        if counts is None:
            counts = self.seconds[label] = [0.0] * (len(CALL_BUCKETS) + 2)
        counts[bisect_left(CALL_BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds
        counts[-1] += seconds

    def collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily("lmgw_dso_calls", "Operator calls to gateways, by method and outcome",
                                    labels=["method", "outcome"])
        for labels, count in self.calls.items():
            calls.add_metric(labels, count)
        yield calls
        seconds = HistogramMetricFamily("lmgw_dso_call_seconds", "Duration of operator calls to gateways",
                                        labels=["method"])
        for label, counts in self.seconds.items():
            seconds.add_metric([label], list(zip(self.BOUNDS, accumulate(counts[:-1]))), counts[-1])
        yield seconds


class ApiMetrics:
    """The server's ``Observer`` (``lmgw.dso.observer``) and the API's counters."""

    def __init__(self, connected: Callable[[], int], now: Callable[[], datetime]) -> None:
        self.now = now
        self.registry = CollectorRegistry()
        self.not_after: dict[str, datetime] = {}
        self.event_listeners: list[Callable[[dict[str, object]], None]] = []
        self._methods: set[str] = set()
        r = self.registry
        self.gateways_connected = Gauge("lmgw_dso_gateways_connected", "Gateways connected to this node",
                                        registry=r)
        self.gateways_connected.set_function(lambda: float(connected()))
        self.handshakes = Counter("lmgw_dso_gateway_handshakes", "Gateway sessions opened on this node", registry=r)
        self.refusals = Counter("lmgw_dso_gateway_refusals", "Gateway handshakes refused, by reason",
                                ["reason"], registry=r)
        self.api_refusals = Counter("lmgw_dso_api_refusals", "Operator API requests refused, by reason",
                                    ["reason"], registry=r)
        self._calls = _CallCollector()
        r.register(self._calls)
        self.events_stored = Counter("lmgw_dso_events_stored", "Gateway events stored (first delivery)", registry=r)
        self.jobs_running = Gauge("lmgw_dso_jobs_running", "Fleet jobs running on this node", registry=r)
        self.job_outcomes = Counter("lmgw_dso_job_outcomes", "Per-gateway outcomes of fleet jobs", ["outcome"],
                                    registry=r)
        self.nats_rtt = Gauge("lmgw_dso_nats_rtt_seconds", "Round trip to this node's NATS server (cluster)",
                              registry=r)
        r.register(_ExpiryCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _method(self, method: str) -> str:
        if method in self._methods:
            return method
        if not METHOD.match(method) or len(self._methods) >= MAX_METHODS:
            return "other"
        self._methods.add(method)
        return method

    # -- the server's Observer --------------------------------------------------

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def connected(self, gateway_id: str, not_after: datetime) -> None:
        self.handshakes.inc()
        self.not_after[gateway_id] = not_after

    def disconnected(self, gateway_id: str) -> None:
        self.not_after.pop(gateway_id, None)

    def called(self, method: str, outcome: str, seconds: float) -> None:
        self._calls.add(self._method(method), outcome, seconds)

    def event_stored(self, record: dict[str, object]) -> None:
        self.events_stored.inc()
        for listener in self.event_listeners:
            listener(record)

    # -- the API ----------------------------------------------------------------

    def api_refused(self, reason: str) -> None:
        self.api_refusals.labels(reason).inc()
