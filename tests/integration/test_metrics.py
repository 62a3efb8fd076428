"""`swarm node --metrics-port`: Prometheus text scraped after real requests from a real client."""

from __future__ import annotations

import re
import time

import pytest
import torch
from metrics_helpers import scrape, value

from swarm.client import DistributedModelForCausalLM
from swarm.client.errors import RequestRefused


def metrics_url(process, pattern: str = r"metrics at (http://\S+/metrics)", timeout: float = 30) -> str:
    return process.wait_for(re.compile(pattern), timeout).group(1)


@pytest.fixture
def node_and_client(tiny_model, local_swarm):
    local_swarm.start_bootstrap()
    node = local_swarm.start_node(
        str(tiny_model),
        "0:6",
        "--metrics-port",
        "0",
        "--cache-tokens",
        "4096",
        "--max-sequence-length",
        "512",
    )
    with DistributedModelForCausalLM.from_pretrained(tiny_model, local_swarm.initial_peers) as client:
        yield node, client, metrics_url(node)


def test_node_metrics_count_real_requests(node_and_client):
    node, client, url = node_and_client
    before = scrape(url)
    assert value(before, "swarm_node_cache_tokens_left") == 4096
    assert value(before, "swarm_node_sessions_open") == 0

    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    with client.inference_session(max_length=64) as session:
        client.generate(prompt, max_new_tokens=5, session=session)
        during = scrape(url)
        assert value(during, "swarm_node_sessions_open") == 1
        assert value(during, "swarm_node_cache_tokens_used") == 64  # batch 1 x max_length 64
        assert value(during, "swarm_node_cache_tokens_left") == 4096 - 64
    # the prompt's step and one per new token but the last (it is never fed back): 5 steps, 11 tokens
    assert value(during, "swarm_node_requests_total", handler="inference_step", outcome="ok") == 5
    assert value(during, "swarm_node_tokens_total", kind="inference") == 7 + 4
    assert value(during, "swarm_node_request_seconds_count", handler="inference_step") == 5

    with torch.no_grad():
        client(torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1)))
    # a session longer than the node allows: refused as too large, the client's fault
    with pytest.raises(RequestRefused), client.inference_session(max_length=100_000) as session:
        client.generate(prompt, max_new_tokens=2, session=session)

    deadline = time.monotonic() + 10  # the session's release is seen once its stream ends
    while value(after := scrape(url), "swarm_node_sessions_open") != 0:
        assert time.monotonic() < deadline, "the node still counts an open session"
        time.sleep(0.2)
    forwards = sum(
        value(after, "swarm_node_requests_total", handler=handler, outcome="ok")
        for handler in ("forward", "forward_stream")
    )
    assert forwards >= 1
    assert value(after, "swarm_node_tokens_total", kind="forward") == 2 * 9
    assert value(after, "swarm_node_errors_sent_total", code="TOO_LARGE") >= 1
    assert (
        value(after, "swarm_node_cache_tokens_left") == 4096 and value(after, "swarm_node_peers_banned") == 0
    )
