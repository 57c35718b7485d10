"""Prometheus metrics of one node (``/metrics``), fed by the server's observer and the API.

One registry per node (not prometheus-client's global one): several nodes may run in one process
(tests, benchmarks).  In a cluster every node reports its own gateways and calls; sum over nodes.
Label values are bounded: a method name outside ``METHOD`` or past ``MAX_METHODS`` distinct names is
counted as ``other``, so an operator typing method names cannot grow the registry without end.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self.calls = Counter("lmgw_dso_calls", "Operator calls to gateways, by method and outcome",
                             ["method", "outcome"], registry=r)
        self.call_seconds = Histogram("lmgw_dso_call_seconds", "Duration of operator calls to gateways",
                                      ["method"], buckets=CALL_BUCKETS, registry=r)
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
        label = self._method(method)
        self.calls.labels(label, outcome).inc()
        self.call_seconds.labels(label).observe(seconds)

    def event_stored(self, record: dict[str, object]) -> None:
        self.events_stored.inc()
        for listener in self.event_listeners:
            listener(record)

    # -- the API ----------------------------------------------------------------

    def api_refused(self, reason: str) -> None:
        self.api_refusals.labels(reason).inc()
