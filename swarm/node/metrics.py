"""What a node counts for Prometheus: requests by handler and outcome, their latency, tokens through the
span, sessions and KV-cache tokens, peers it refuses, and the error replies it sends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from swarm.utils.metrics import LATENCY_BUCKETS


class NodeMetrics:
    """A node's metrics, in a registry of its own (one node per process, but tests run several).

    :param sessions: () -> the backend's `SessionBudget` now (the node may move to other blocks), or None
    """

    def __init__(self, sessions: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "swarm_node_requests",
            "Requests handled, by handler and outcome (ok, or the code of the error sent back)",
            ["handler", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "swarm_node_request_seconds",
            "Seconds from a request (an inference step) arriving to its reply, by handler",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "swarm_node_tokens",
            "Token positions (batch x sequence) through this node's blocks, by kind of call",
            ["kind"],
            registry=self.registry,
        )
        self.errors = Counter(
            "swarm_node_errors_sent", "Error replies sent, by code", ["code"], registry=self.registry
        )
        self._sessions = sessions
        Gauge("swarm_node_sessions_open", "Inference sessions open", registry=self.registry).set_function(
            lambda: self._budget("num_sessions")
        )
        Gauge(
            "swarm_node_cache_tokens_used",
            "KV-cache tokens reserved by open sessions",
            registry=self.registry,
        ).set_function(lambda: self._budget("max_tokens") - self._budget("tokens_left"))
        Gauge(
            "swarm_node_cache_tokens_left", "KV-cache tokens free for new sessions", registry=self.registry
        ).set_function(lambda: self._budget("tokens_left"))
        self.banned_peers: Callable[[], int] = lambda: 0
        Gauge(
            "swarm_node_peers_banned",
            "Peers this node refuses (a training node: banned from the run)",
            registry=self.registry,
        ).set_function(lambda: self.banned_peers())

    def _budget(self, name: str) -> float:
        budget = self._sessions()
        return float(getattr(budget, name)) if budget is not None else 0.0

    @contextmanager
    def request(self, handler: str) -> Iterator[dict]:
        """Time one request; the body sets outcome["outcome"] to an error code's name when it fails."""
        outcome = {"outcome": "ok"}
        started = time.perf_counter()
        try:
            yield outcome
        except BaseException:  # the caller went away (cancelled) or the handler broke
            outcome["outcome"] = "interrupted"
            raise
        finally:
            self.latency.labels(handler).observe(time.perf_counter() - started)
            self.requests.labels(handler, outcome["outcome"]).inc()
