"""Prometheus text over HTTP for a process's own registry (`--metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

# request latencies from a cached decoding step (milliseconds) to a long prefill or a dispute (a minute)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsServer:
    """Serves `registry` at http://host:port/metrics from a daemon thread until `close()`; port 0 picks a
    free port (see `port`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host, self.port = host, self._server.server_port  # the bound port when asked for 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
