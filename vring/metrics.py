"""Prometheus metrics for ``vring net --metrics HOST:PORT`` (loopback by default).

A custom collector: each scrape reads the device's shared counter and queue-state arrays (the
same numbers ``vring stats`` shows) and yields one sample per device port and vring; nothing is
counted twice and the data plane is never touched or paused. Needs ``prometheus-client``.

Metrics (labels ``device``, ``port``, ``vring``, ``queue`` (pair), ``dir`` (rx: to the driver,
tx: from the driver)):

- ``vring_packets_total``, ``vring_bytes_total``, ``vring_drops_total``, ``vring_notifications_total``
  (calls into the driver), ``vring_errors_total``, ``vring_batches_total``, ``vring_held_total``
  (polls that left frames in a TX vring for want of a buffer in this RX vring) -- counters
- ``vring_queue_ready``, ``vring_queue_broken`` (reason code, 0 = fine), ``vring_queue_size``,
  ``vring_queue_pending`` (chains available, not yet popped) -- gauges
- ``vring_port_connected`` (per port), ``vring_poll_empty_ratio``, ``vring_rounds_total``
"""
from __future__ import annotations

import threading

COUNTERS = {
    "packets": ("vring_packets", "Frames moved through the vring"),
    "bytes": ("vring_bytes", "Frame bytes (without the virtio-net header) moved through the vring"),
    "drops": ("vring_drops", "Frames dropped toward an RX vring (no room, no front-end, not ready) or taken from a TX "
              "vring and dropped (longer than the MTU)"),
    "calls": ("vring_notifications", "Notifications (call eventfd writes) sent to the driver"),
    "errors": ("vring_errors", "Malformed chains and ring errors"),
    "batches": ("vring_batches", "Data-plane batches that used the vring"),
    "held": ("vring_held", "Polls that left frames waiting in a TX vring because this RX vring had no free buffer "
             "(vring net --hold-us)"),
}


def parse_addr(text: str) -> tuple[str, int]:
    """'127.0.0.1:9100', ':9100' or '9100' -> (host, port); the host defaults to loopback."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class VringCollector:
    """A prometheus_client collector over a live device (and its server's sessions, when given)."""

    def __init__(self, dev, server=None, name: str = "net"):
        self.dev = dev
        self.server = server
        self.name = name

    def describe(self):
        return []  # unchecked collector: labels depend on the device

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from vring.control import sample

        s = sample(self.dev, self.server)
        labels = ["device", "port", "vring", "queue", "dir"]
        fams = {k: CounterMetricFamily(n, h, labels=labels) for k, (n, h) in COUNTERS.items()}
        ready = GaugeMetricFamily("vring_queue_ready", "1 while the data plane may use the vring", labels=labels)
        broken = GaugeMetricFamily("vring_queue_broken", "Reason code the vring was stopped for (0: fine)",
                                   labels=labels)
        size = GaugeMetricFamily("vring_queue_size", "Vring size (descriptors)", labels=labels)
        pending = GaugeMetricFamily("vring_queue_pending", "Chains available that the back-end has not popped",
                                    labels=labels)
        for q in s["queues"]:
            lv = [self.name, str(q["port"]), str(q["vring"]), str(q["pair"]), q["dir"]]
            for k, fam in fams.items():
                fam.add_metric(lv, q[k])
            ready.add_metric(lv, q["ready"])
            broken.add_metric(lv, q["broken"])
            size.add_metric(lv, q["size"])
            if q["pending"] is not None:
                pending.add_metric(lv, q["pending"])
        yield from fams.values()
        yield from (ready, broken, size, pending)
        conn = GaugeMetricFamily("vring_port_connected", "1 while a front-end is connected to the port",
                                 labels=["device", "port"])
        for p in s["ports"]:
            if "connected" in p:
                conn.add_metric([self.name, str(p["port"])], 1 if p["connected"] else 0)
        yield conn
        if "worker" in s:
            yield CounterMetricFamily("vring_rounds", "Data-plane rounds over all links",
                                      value=s["worker"]["rounds"], labels=None)
        poll = s.get("poll") or {}
        if "empty_share" in poll:
            yield GaugeMetricFamily("vring_poll_empty_ratio", "Share of polls of a ready ring that found nothing",
                                    value=poll["empty_share"])


class MetricsServer:
    """The HTTP endpoint (prometheus_client's WSGI server in a daemon thread) with its own registry."""

    def __init__(self, dev, server=None, addr: str = "127.0.0.1:9100", name: str = "net"):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as e:  # pragma: no cover
            raise SystemExit("--metrics needs prometheus-client (pip install 'vring[metrics]')") from e
        self.host, self.port = parse_addr(addr)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(VringCollector(dev, server, name))
        res = start_http_server(self.port, addr=self.host, registry=self.registry)
        self._httpd, self._thread = res if isinstance(res, tuple) else (None, None)
        if self._httpd is not None:
            self.port = self._httpd.server_address[1]  # port 0: the one the kernel chose

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if isinstance(self._thread, threading.Thread):
                self._thread.join(5)


def serve(dev, server=None, addr: str = "127.0.0.1:9100", name: str = "net") -> MetricsServer:
    return MetricsServer(dev, server, addr, name)


def generate(dev, server=None) -> bytes:
    """One scrape's text without HTTP (for tests and notebooks)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(VringCollector(dev, server))
    return generate_latest(reg)
