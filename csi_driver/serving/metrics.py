"""Prometheus metrics (`--metrics-address`, off by default).

RPC counts and latencies are recorded by an observer the server's interceptor calls after
every call. Everything about the node's volumes is read from the store when Prometheus
scrapes, by a custom collector, so the numbers cannot drift from the files."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..settings import parse_address
from ..volumes.datastore.fencing import fence_of
from ..volumes.readiness import disk_full, readiness
from ..volumes.status import store_totals

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .driver import Driver

log = logging.getLogger(__name__)

NAMESPACE = "thinloop"
DEFAULT_PORT = 9809
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
"""CSI calls run from milliseconds (Probe) to minutes (mkfs of a large eagerzeroedthick image)."""


class NodeCollector(Collector):
    """Reads the store, the in-flight set and readiness at scrape time."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def collect(self) -> Iterable[Metric]:
        settings = self.driver.settings
        node = settings.node_id
        info = InfoMetricFamily(f"{NAMESPACE}_build", "Driver version and configuration.",
                                labels=None)
        info.add_metric([], {"version": __version__, "driver_name": settings.driver_name,
                             "mode": settings.mode, "node": node})
        yield info
        inflight = GaugeMetricFamily(f"{NAMESPACE}_operations_in_flight",
                                     "Volume and snapshot operations running now.")
        inflight.add_metric([], self.driver.busy())
        yield inflight
        yield from self._readiness(node)
        if self.driver.store is not None:
            yield from self._store(node)
        if self.driver.settings.shared:
            yield from self._datastore(node)

    def _datastore(self, node: str) -> Iterable[Metric]:
        """Shared mode: the datastore's probed capabilities and the volumes not served."""
        name = self.driver.settings.datastore
        caps = GaugeMetricFamily(f"{NAMESPACE}_datastore_capability",
                                 "What the datastore's filesystem can do, probed at start-up: 1 yes, "
                                 "0 no (the driver falls back, see docs), -1 not known.",
                                 labels=["node", "datastore", "capability"])
        if self.driver.caps is not None:
            for cap, value in self.driver.caps.items():
                caps.add_metric([node, name, cap], value)
        yield caps
        split = GaugeMetricFamily(f"{NAMESPACE}_datastore_split_brain",
                                  "1 for each volume attached on this node that the datastore's records "
                                  "say another node holds (or that is not published here); not served.",
                                  labels=["node", "datastore", "volume"])
        volumes = self.driver.volumes
        for volume in sorted(self.driver.fenced):
            if volumes is not None and fence_of(self.driver.fenced, volume, volumes.store, volumes.os):
                split.add_metric([node, name, volume], 1)
        yield split
        yield from self._freezes(node, name)

    def _freezes(self, node: str, name: str) -> Iterable[Metric]:
        """Shared mode, node: the controller's freeze requests this node served
        (csi_driver.volumes.datastore.freeze), its early thaws, and what it holds frozen now."""
        freezer = self.driver.freezer
        served = CounterMetricFamily(f"{NAMESPACE}_datastore_freeze_requests",
                                     "Requests to freeze a volume attached here for a controller's copy, "
                                     "by answer: frozen, synced (raw block), refused.",
                                     labels=["node", "datastore", "outcome"])
        thaws = CounterMetricFamily(f"{NAMESPACE}_datastore_auto_thaws",
                                    "Filesystems this node thawed before the controller withdrew its request "
                                    "(the copy is then discarded), by reason.",
                                    labels=["node", "datastore", "reason"])
        held = GaugeMetricFamily(f"{NAMESPACE}_datastore_frozen_volumes",
                                 "Volumes this node holds frozen (or flushed, raw block) for a controller now.",
                                 labels=["node", "datastore"])
        if freezer is not None:
            for outcome, count in freezer.stats.served.items():
                served.add_metric([node, name, outcome], count)
            for reason, count in freezer.stats.auto_thaws.items():
                thaws.add_metric([node, name, reason], count)
            held.add_metric([node, name], len(freezer.held))
        yield served
        yield thaws
        yield held

    def _readiness(self, node: str) -> Iterable[Metric]:
        try:
            reason = readiness(self.driver.settings, self.driver.oslayer)
        except OSError as exc:
            reason = f"readiness check failed: {exc}"
        ready = GaugeMetricFamily(f"{NAMESPACE}_ready",
                                  "1 when Probe reports ready, 0 when not (see thinloop_not_ready).",
                                  labels=["node"])
        ready.add_metric([node], 0 if reason else 1)
        yield ready
        why = GaugeMetricFamily(f"{NAMESPACE}_not_ready",
                                "Present with value 1 and the reason while the driver is not ready.",
                                labels=["node", "reason"])
        if reason:
            why.add_metric([node, reason], 1)
        yield why
        if self.driver.oslayer is not None:
            full = GaugeMetricFamily(f"{NAMESPACE}_data_dir_full",
                                     "1 while the data dir's filesystem has no free block (the driver "
                                     "stays ready so volumes can still be deleted).", labels=["node"])
            full.add_metric([node], 1 if disk_full(self.driver.settings) else 0)
            yield full

    def _store(self, node: str) -> Iterable[Metric]:
        assert self.driver.store is not None
        try:
            t = store_totals(self.driver.store)
        except OSError as exc:
            log.warning("metrics: cannot read the data dir: %s", exc)
            return
        volumes_ = self.driver.volumes
        available = volumes_.available_bytes() if volumes_ is not None else t.free_bytes
        gauges: Sequence[tuple[str, str, float]] = (
            ("volumes", "Volumes on this node.", t.volumes),
            ("snapshots", "Snapshots on this node.", t.snapshots),
            ("provisioned_bytes", "Sum of volume sizes (what claims were promised).",
             t.provisioned_bytes),
            ("allocated_bytes", "Host disk blocks used by volume images.", t.allocated_bytes),
            ("snapshot_allocated_bytes", "Host disk blocks used by snapshot images.",
             t.snapshot_allocated_bytes),
            ("capacity_bytes", "Size of the filesystem holding the data dir.", t.capacity_bytes),
            ("free_bytes", "Free space on the filesystem holding the data dir.", t.free_bytes),
            ("available_bytes", "What GetCapacity reports: free space minus unused thin promises "
             "over the overcommit ratio.", available),
        )
        for name, help_, value in gauges:
            g = GaugeMetricFamily(f"{NAMESPACE}_{name}", help_, labels=["node"])
            g.add_metric([node], value)
            yield g


@dataclass
class Metrics:
    """The driver's metrics in a registry of its own (nothing global, so tests and several
    drivers in one process do not collide)."""

    registry: CollectorRegistry
    rpcs: Counter
    latency: Histogram
    recoveries: Counter

    @classmethod
    def for_driver(cls, driver: Driver, recovery_actions: Sequence[str] = ()) -> Metrics:
        registry = CollectorRegistry(auto_describe=True)
        rpcs = Counter("rpc_requests", "CSI calls answered, by method and gRPC status code.",
                       ["method", "code"], namespace=NAMESPACE, registry=registry)
        latency = Histogram("rpc_duration_seconds", "Time to answer a CSI call.",
                            ["method", "code"], namespace=NAMESPACE, registry=registry,
                            buckets=LATENCY_BUCKETS)
        recoveries = Counter("recovery_actions", "Leftovers of interrupted operations cleared "
                             "or finished at start-up.", namespace=NAMESPACE, registry=registry)
        recoveries.inc(len(recovery_actions))
        registry.register(NodeCollector(driver))
        return cls(registry, rpcs, latency, recoveries)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """A server.Observer: called after every RPC."""
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)


class MetricsServer:
    """The HTTP endpoint: /metrics (any path answers with the metrics)."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        host, port = parse_address(address)
        self.metrics = metrics
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(port, host, metrics.registry)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start(driver: Driver, address: str, recovery_actions: Sequence[str]) -> MetricsServer:
    """Register the RPC observer on the driver and serve metrics on address."""
    metrics = Metrics.for_driver(driver, recovery_actions)
    server = MetricsServer(metrics, address)
    driver.observers.append(metrics.observe)
    log.info("serving Prometheus metrics on %s (port %d)", address, server.port)
    return server
