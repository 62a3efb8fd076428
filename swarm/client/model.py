"""DistributedModelForCausalLM: a Hugging Face-style model whose blocks run on the swarm."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarm.client.bans import BanList
from swarm.client.errors import MissingBlocksError, RemoteError
from swarm.client.generation import generate
from swarm.client.inference import InferenceSession
from swarm.client.remote import remote_forward
from swarm.client.swarm_view import RemoteSpan, consensus_hashes, make_route, read_swarm, usable_servers
from swarm.dht.factory import create_dht
from swarm.models.checkpoint import Checkpoint, all_block_hashes, resolve_checkpoint
from swarm.models.head import load_client_head, load_generation_config
from swarm.utils.aio import BackgroundLoop

logger = logging.getLogger(__name__)


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


class DistributedModelForCausalLM(torch.nn.Module):
    """Embeddings and LM head run here; the transformer blocks run on nodes found through the DHT."""

    def __init__(self, checkpoint: Checkpoint, config: ClientConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.checkpoint, self.client_config = checkpoint, config
        self.config = checkpoint.config
        self.head = load_client_head(checkpoint, dtype=dtype)
        self.generation_config = load_generation_config(checkpoint.path)
        self.num_blocks = checkpoint.num_blocks
        self.bans = BanList()
        self._expected_hashes: list[str] | None = None
        self._loop = BackgroundLoop()
        self.dht, _ = create_dht(config.initial_peers, client_mode=True)
        self.p2p: P2P = self._loop.run(self.dht.replicate_p2p(), timeout=config.dht_timeout)
        self.last_route: list[RemoteSpan] = []

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        model_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        **config_kwargs,
    ) -> DistributedModelForCausalLM:
        """Load the client-side parts of a model (same names and paths as `swarm node`) and join the swarm."""
        checkpoint = resolve_checkpoint(name_or_path, cache_dir, model_name)
        return cls(checkpoint, ClientConfig(initial_peers=list(initial_peers), **config_kwargs), dtype=dtype)

    # ---- the swarm ----------------------------------------------------------------------------------------

    def expected_hashes(self, model_infos) -> list[str] | None:
        """Trust the local checkpoint's block hashes when it holds the blocks, else the DHT's consensus."""
        if not self.client_config.verify_weights:
            return None
        if self._expected_hashes is None and self.checkpoint.block_tensor_names(0):
            self._expected_hashes = all_block_hashes(self.checkpoint)
        return self._expected_hashes or consensus_hashes(model_infos)

    def find_route(self, start: int = 0, end: int | None = None) -> list[RemoteSpan]:
        """A chain of nodes covering blocks [start, end); waits a bounded time for missing blocks."""
        end = self.num_blocks if end is None else end
        deadline = time.monotonic() + self.client_config.wait_for_blocks
        while True:
            servers, model_infos = read_swarm(
                self.dht, self.checkpoint.name, self.num_blocks, self.client_config.dht_timeout
            )
            usable = usable_servers(servers, self.expected_hashes(model_infos), self.bans.active())
            try:
                return make_route(usable, start, end)
            except MissingBlocksError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def ban(self, peer_id: str) -> None:
        """Stop routing through a node for a while; each repeated failure doubles the wait."""
        self.bans.ban(peer_id)

    def run_async(self, coro, timeout: float | None = None):
        """Run a coroutine on the client's event loop thread and wait for its result."""
        return self._loop.run(coro, timeout=timeout)

    # ---- forward ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Hidden states through all blocks on the swarm; a failing node is banned and the rest re-routed."""
        block, attempts = 0, 0
        route = self.find_route()
        self.last_route = []
        while block < self.num_blocks:
            span = route[0]
            try:
                hidden = self._loop.run(
                    remote_forward(
                        self.p2p,
                        span.peer_id,
                        span.start,
                        span.end,
                        hidden,
                        attention_mask,
                        position_ids,
                        self.client_config.request_timeout,
                    ),
                    timeout=self.client_config.request_timeout + 5,
                )
                self.last_route.append(span)
                block = span.end
                route = route[1:]
            except (RemoteError, TimeoutError, OSError, Exception) as e:
                attempts += 1
                logger.warning("node %s failed on blocks [%d, %d): %r", span.peer_id, span.start, span.end, e)
                if attempts > self.client_config.max_retries:
                    raise
                self.ban(span.peer_id)
                route = self.find_route(block)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids`, as transformers' LlamaForCausalLM computes them (positions 0..n-1)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
        with torch.inference_mode():
            hidden = self.head.embed(input_ids)
            hidden = self.run_blocks(hidden, attention_mask, position_ids)
            logits = self.head.logits(hidden)
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
