"""DistributedModelForCausalLM: a Hugging Face-style model whose blocks run on the swarm."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client.autograd import RemoteBlocksFunction, SwarmBlocks
from swarm.client.bans import BanList
from swarm.client.errors import MissingBlocksError
from swarm.client.generation import generate
from swarm.client.inference import InferenceSession
from swarm.client.remote import get_info
from swarm.client.routing import min_latency_route, throughput_weighted_route
from swarm.client.swarm_view import RemoteSpan, consensus_hashes, read_swarm, usable_servers
from swarm.dht.factory import create_dht
from swarm.models.checkpoint import Checkpoint, all_block_hashes, resolve_checkpoint
from swarm.models.head import load_client_head, load_generation_config
from swarm.proto import swarm_pb2
from swarm.utils.aio import BackgroundLoop

logger = logging.getLogger(__name__)

RTT_MAX_AGE = 60.0  # seconds before a node is pinged again
MAX_PINGS = 64  # nodes pinged at once when routing
PING_TIMEOUT = 2.0
UNREACHABLE_RTT = 10.0  # what a node that does not answer a ping costs a route


@dataclass
class ClientConfig:
    """How the client talks to the swarm."""

    initial_peers: list[str] = field(default_factory=list)
    request_timeout: float = 60.0
    dht_timeout: float = 10.0
    max_retries: int = 3
    wait_for_blocks: float = 30.0  # how long to wait for missing blocks to appear before giving up
    verify_weights: bool = True  # skip nodes whose weight hashes differ from the model's
    max_step_tokens: int = 1024  # longer prompts are prefilled in chunks of at most this many tokens
    max_chunk_rows: int | None = None  # forward/backward micro-batch rows (None: as many as fit a message)
    refresh_period: float = 10.0  # seconds between re-reads of the swarm from the DHT
    allowed_servers: list[str] | None = None  # if set, route only through these peer ids
    blocked_servers: list[str] = field(default_factory=list)  # never route through these peer ids


class DistributedModelForCausalLM(torch.nn.Module):
    """Embeddings and LM head run here; the transformer blocks run on nodes found through the DHT."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: ClientConfig,
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        # checked before the DHT starts, so a bad argument leaves no process behind
        if tuning_mode not in (None, "ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be None, 'ptune' or 'deep_ptune', got {tuning_mode!r}")
        if tuning_mode and pre_seq_len < 1:
            raise ValueError("prompt tuning needs pre_seq_len >= 1")
        self.checkpoint, self.client_config = checkpoint, config
        self.config = checkpoint.config
        # the head computes on `device`; what crosses the network, and the session's bookkeeping, is on CPU
        self.device = torch.device(device)
        self.head = load_client_head(checkpoint, dtype=dtype).to(self.device)
        self.generation_config = load_generation_config(checkpoint.path)
        self.num_blocks = checkpoint.num_blocks
        self.bans = BanList()
        self._expected_hashes: list[str] | None = None
        self._loop = BackgroundLoop()
        self.dht, _ = create_dht(config.initial_peers, client_mode=True)
        self.p2p: P2P = self._loop.run(self.dht.replicate_p2p(), timeout=config.dht_timeout)
        self.last_route: list[RemoteSpan] = []
        self._view = None
        self._view_time = 0.0
        self._rtts: dict[str, tuple[float, float]] = {}  # peer id -> (round trip seconds, when measured)
        self._rng = random.Random()
        self.blocks = SwarmBlocks(self)
        self.tuning_mode, self.pre_seq_len = tuning_mode, pre_seq_len
        if tuning_mode:
            hidden_size = self.config.hidden_size
            self.prompt_embeddings = torch.nn.Embedding(pre_seq_len, hidden_size, dtype=dtype, device=device)
            torch.nn.init.normal_(self.prompt_embeddings.weight, std=self.config.initializer_range)
            if tuning_mode == "deep_ptune":
                self.intermediate_prompt_embeddings = torch.nn.Embedding(
                    pre_seq_len, self.num_blocks * hidden_size, dtype=dtype, device=device
                )
                torch.nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        model_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        device: str | torch.device = "cpu",
        **config_kwargs,
    ) -> DistributedModelForCausalLM:
        """Load the client-side parts of a model (same names and paths as `swarm node`) and join the swarm."""
        checkpoint = resolve_checkpoint(name_or_path, cache_dir, model_name)
        config = ClientConfig(initial_peers=list(initial_peers), **config_kwargs)
        return cls(
            checkpoint, config, dtype=dtype, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len, device=device
        )

    # ---- the swarm ----------------------------------------------------------------------------------------

    def expected_hashes(self, model_infos) -> list[str] | None:
        """Trust the local checkpoint's block hashes when it holds the blocks, else the DHT's consensus."""
        if not self.client_config.verify_weights:
            return None
        if self._expected_hashes is None and self.checkpoint.block_tensor_names(0):
            self._expected_hashes = all_block_hashes(self.checkpoint)
        return self._expected_hashes or consensus_hashes(model_infos)

    def usable_servers(self, refresh: bool = False) -> list[swarm_pb2.ServerInfo]:
        """ONLINE nodes with the right weights that are neither banned nor filtered out.

        The view of the swarm is re-read from the DHT every `refresh_period` seconds, or at once on request.
        """
        config = self.client_config
        stale = time.monotonic() - self._view_time > config.refresh_period
        if refresh or stale or self._view is None:
            self._view = read_swarm(self.dht, self.checkpoint.name, self.num_blocks, config.dht_timeout)
            self._view_time = time.monotonic()
        servers, model_infos = self._view
        usable = usable_servers(servers, self.expected_hashes(model_infos), self.bans.active())
        if config.allowed_servers is not None:
            usable = [s for s in usable if s.peer_id in set(config.allowed_servers)]
        return [s for s in usable if s.peer_id not in set(config.blocked_servers)]

    def find_route(self, start: int = 0, end: int | None = None, mode: str = "inference") -> list[RemoteSpan]:
        """A chain of nodes covering blocks [start, end); waits a bounded time for missing blocks.

        `inference`: the lowest-latency chain (measured RTTs, announced throughput, fewer hops);
        `forward`: a throughput-weighted random chain, which spreads batches over replicas.
        """
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.client_config.wait_for_blocks
        refresh = False
        while True:
            usable = self.usable_servers(refresh=refresh)
            try:
                if mode == "inference":
                    return min_latency_route(usable, start, end, self.measure_rtts(usable))
                return throughput_weighted_route(usable, start, end, self._rng)
            except MissingBlocksError:
                if time.monotonic() >= deadline:
                    raise
                refresh = True  # a block ran out of nodes: look again now, not at the next refresh
                time.sleep(0.5)

    def measure_rtts(self, servers: list[swarm_pb2.ServerInfo]) -> dict[str, float]:
        """Round-trip times to nodes (pinged with rpc_info when unknown or older than a minute)."""
        now = time.monotonic()
        todo = [s.peer_id for s in servers if now - self._rtts.get(s.peer_id, (0.0, -1e9))[1] > RTT_MAX_AGE][
            :MAX_PINGS
        ]
        if todo:

            async def ping(peer_id: str) -> float:
                started = time.perf_counter()
                try:
                    await get_info(self.p2p, peer_id, PING_TIMEOUT)
                    return time.perf_counter() - started
                except Exception:
                    return UNREACHABLE_RTT

            async def ping_all():
                return await asyncio.gather(*(ping(peer) for peer in todo))

            for peer, rtt in zip(todo, self.run_async(ping_all()), strict=True):
                self._rtts[peer] = (rtt, now)
        return {peer: rtt for peer, (rtt, _) in self._rtts.items()}

    def ban(self, peer_id: str) -> None:
        """Stop routing through a node for a while; each repeated failure doubles the wait."""
        self.bans.ban(peer_id)

    def run_async(self, coro, timeout: float | None = None):
        """Run a coroutine on the client's event loop thread and wait for its result."""
        return self._loop.run(coro, timeout=timeout)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids`, as transformers' LlamaForCausalLM computes them (positions 0..n-1).

        With prompt tuning, the trainable prompts go before the tokens; logits are returned for the
        tokens only, and gradients flow back to the prompts through the swarm.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        prefix = self.pre_seq_len if self.tuning_mode else 0
        if attention_mask is not None and prefix:
            attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if position_ids is None:
            position_ids = torch.arange(prefix + seq_len).unsqueeze(0).expand(batch, -1)
        elif prefix:
            position_ids = torch.cat([torch.arange(prefix).expand(batch, -1), position_ids + prefix], dim=1)
        if attention_mask is not None:
            attention_mask = attention_mask.cpu()
        position_ids = position_ids.cpu()
        hidden = self.head.embed(input_ids.to(self.device))
        deep_prompts = None
        if self.tuning_mode:
            prompts = self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1)
            hidden = torch.cat([prompts.to(hidden.dtype), hidden], dim=1)
            if self.tuning_mode == "deep_ptune":
                weight = self.intermediate_prompt_embeddings.weight  # (prefix, blocks * hidden)
                deep_prompts = weight.view(prefix, self.num_blocks, -1).permute(1, 0, 2).unsqueeze(1)
        needs_grad = hidden.requires_grad or (deep_prompts is not None and deep_prompts.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            prompts_arg = deep_prompts if deep_prompts is not None else hidden.new_zeros(0)
            hidden = RemoteBlocksFunction.apply(
                hidden, prompts_arg, self.blocks, attention_mask, position_ids
            )
        else:
            with torch.no_grad():
                hidden, _ = self.blocks.forward(
                    hidden.detach(),
                    None if deep_prompts is None else deep_prompts.detach(),
                    attention_mask,
                    position_ids,
                )
        logits = self.head.logits(hidden[:, prefix:])
        return CausalLMOutputWithPast(logits=logits)

    # ---- generation ---------------------------------------------------------------------------------------

    def inference_session(self, max_length: int) -> InferenceSession:
        """A session with a KV cache for up to `max_length` tokens on every node of its route."""
        return InferenceSession(self, max_length)

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Like transformers' generate(): greedy or sampled, EOS, batches with attention_mask, sessions.

        Returns the whole sequence so far: the prompt plus every token generated (in the session).
        """
        return generate(self, input_ids, **kwargs)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the swarm: stop the P2P replica, the DHT process and the event loop."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self._loop.run(self.p2p.shutdown(), timeout=5)
        except Exception as e:
            logger.debug("p2p shutdown: %r", e)
        self.dht.shutdown()
        self._loop.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
