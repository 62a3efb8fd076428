"""What the verification tests share: named node processes on one span, a bare P2P client, a padded batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from swarm.dht.factory import create_dht
from swarm.local import LocalSwarm
from swarm.utils.aio import BackgroundLoop


def start_named_nodes(
    swarm: LocalSwarm, model, span: tuple[int, int], flags: dict[str, tuple[str, ...]], *common: str
) -> dict:
    """One node process per name on blocks `span`, each with `common` and its own flags; waits until all
    serve (started together: they load and announce in parallel)."""
    blocks = f"{span[0]}:{span[1]}"
    return start_nodes(swarm, model, {name: (blocks, *common, *extra) for name, extra in flags.items()})


def start_nodes(swarm: LocalSwarm, model, specs: dict[str, tuple[str, ...]]) -> dict:
    """One node process per name, each with its spec ("A:B" blocks, then flags); waits until all serve."""
    processes = {
        name: swarm.start_node(str(model), *spec, wait=False, name=name) for name, spec in specs.items()
    }
    for process in processes.values():
        swarm.wait_ready(process, timeout=300)
    return processes


@contextmanager
def p2p_client(initial_peers: list[str]) -> Iterator[tuple[BackgroundLoop, object]]:
    """(loop, p2p) of a client-mode DHT peer, for calling nodes' RPCs directly; stopped on exit."""
    loop = BackgroundLoop()
    dht, _ = create_dht(initial_peers, client_mode=True)
    p2p = loop.run(dht.replicate_p2p())
    try:
        yield loop, p2p
    finally:
        loop.run(p2p.shutdown())
        dht.shutdown()
        loop.close()


def padded_request(hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of 2 sequences of 7 hidden states, the second left-padded by 2 (so attention
    sees a real mask)."""
    hidden = torch.randn(2, 7, hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    return hidden, mask
