"""What the gateway counts for Prometheus: calls by RPC and outcome, their latency and time to the first
token, tokens streamed, and generations in progress."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from swarm.utils.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    """The gateway's metrics, in a registry of its own."""

    def __init__(self, running: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "swarm_gateway_requests",
            "Calls by RPC and outcome (OK or the gRPC status code sent)",
            ["rpc", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "swarm_gateway_request_seconds",
            "Seconds from a call to its last message, by RPC",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "swarm_gateway_first_token_seconds",
            "Seconds from a Generate call to its first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter("swarm_gateway_tokens", "Tokens streamed to clients", registry=self.registry)
        Gauge(
            "swarm_gateway_generations_running",
            "Generations in progress (their threads, until they notice a client went away)",
            registry=self.registry,
        ).set_function(running)
