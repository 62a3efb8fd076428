"""A node's lifecycle: join the DHT, load its span, serve RPCs, announce itself, leave cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

import swarm
from swarm.dht.announcer import Announcer, store_node_records
from swarm.dht.factory import create_dht
from swarm.models.checkpoint import Checkpoint, all_block_hashes, resolve_checkpoint
from swarm.models.span import load_span
from swarm.node.backend import SpanBackend
from swarm.node.handler import NodeServicer
from swarm.node.limits import NodeLimits
from swarm.node.throughput import measure_span_rps
from swarm.proto import swarm_pb2

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class NodeConfig:
    """Everything `swarm node` can be told; the CLI's defaults are these defaults."""

    model: str
    blocks: tuple[int, int] | None = None
    initial_peers: list[str] = field(default_factory=list)
    model_name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 0
    identity_path: str | None = None
    update_period: float = 30.0
    cache_dir: str | None = None
    throughput: float | None = None
    limits: NodeLimits = field(default_factory=NodeLimits)


class Node:
    """Serves blocks [start, end) of one model until stopped (SIGTERM / SIGINT / stop())."""

    def __init__(self, config: NodeConfig):
        if config.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {config.dtype!r}; choose from {list(DTYPES)}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {config.device} requested but CUDA is not available")
        if config.blocks is None:
            raise ValueError("a node needs --blocks START:END")
        self.config = config
        self.stop_event: asyncio.Event | None = None
        self.state = swarm_pb2.ServerInfo.JOINING
        self.peer_id: str | None = None
        self.backend: SpanBackend | None = None
        self.block_hashes: list[str] = []
        self.forward_rps = self.inference_rps = 0.0

    def server_info(self, state: int | None = None) -> swarm_pb2.ServerInfo:
        start, end = self.config.blocks
        throughput = self.config.throughput if self.config.throughput is not None else self.inference_rps
        return swarm_pb2.ServerInfo(
            state=self.state if state is None else state,
            peer_id=self.peer_id,
            model=self.checkpoint.name,
            start_block=start,
            end_block=end,
            throughput=throughput,
            inference_rps=self.inference_rps,
            forward_rps=self.forward_rps,
            dtype=self.config.dtype,
            device=self.config.device,
            version=swarm.__version__,
            block_hashes=self.block_hashes[start:end] if self.block_hashes else ["0" * 64] * (end - start),
        )

    def model_info(self) -> swarm_pb2.ModelInfo:
        config = self.checkpoint.config
        return swarm_pb2.ModelInfo(
            model=self.checkpoint.name,
            architecture="llama",
            num_blocks=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            block_hashes=self.block_hashes,
        )

    def run(self) -> None:
        """Block until stopped; always releases the DHT, the P2P daemon and the compute thread."""
        asyncio.run(self._serve())

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        config = self.config
        start, end = config.blocks
        self.checkpoint: Checkpoint = await asyncio.to_thread(
            resolve_checkpoint, config.model, config.cache_dir, config.model_name
        )
        if not 0 <= start < end <= self.checkpoint.num_blocks:
            raise ValueError(f"--blocks {start}:{end} is outside the model's {self.checkpoint.num_blocks} blocks")
        # the DHT forks a process: start it before any weights (or CUDA) are loaded
        dht, signer = create_dht(
            config.initial_peers, host=config.host, port=config.port, identity_path=config.identity_path
        )
        announcer = p2p = servicer = None
        try:
            self.peer_id = dht.peer_id.to_base58()
            owner_key = signer.local_public_key
            expiration = max(2 * config.update_period, 3.0)
            await asyncio.to_thread(store_node_records, dht, owner_key, self.server_info(), None, expiration)

            dtype = DTYPES[config.dtype]
            span = await asyncio.to_thread(load_span, self.checkpoint, start, end, dtype, config.device)
            self.block_hashes = await asyncio.to_thread(all_block_hashes, self.checkpoint, config.cache_dir)
            self.forward_rps, self.inference_rps = await asyncio.to_thread(
                measure_span_rps, span, config.device, dtype
            )
            self.backend = SpanBackend(span, config.limits, config.device, dtype)

            p2p = await dht.replicate_p2p()
            servicer = NodeServicer(self.backend, self.server_info, self.model_info())
            await servicer.add_p2p_handlers(p2p)
            self.state = swarm_pb2.ServerInfo.ONLINE
            announcer = Announcer(dht, owner_key, self.server_info, self.model_info(), config.update_period)
            announcer.start()
            maddrs = " ".join(str(m) for m in dht.get_visible_maddrs())
            logger.info(
                "node %s serving blocks [%d, %d) of %s on %s (%s, %s) at %s",
                self.peer_id, start, end, self.checkpoint.name, config.device, config.dtype,
                f"{self.inference_rps:.1f} steps/s", maddrs,
            )
            await self.stop_event.wait()
            logger.info("node %s shutting down", self.peer_id)
        finally:
            self.state = swarm_pb2.ServerInfo.OFFLINE
            if announcer is not None:
                await asyncio.to_thread(announcer.stop, self.server_info())
            if servicer is not None and p2p is not None:
                await servicer.remove_p2p_handlers(p2p)
            if p2p is not None:
                await p2p.shutdown()
            if self.backend is not None:
                self.backend.shutdown()
            dht.shutdown()


def parse_blocks(text: str) -> tuple[int, int]:
    """Parse "A:B" into a half-open block range."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"--blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def write_lines_atomically(path: str | Path, lines: list[str]) -> None:
    """Write a file that readers never see half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)
