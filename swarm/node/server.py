"""A node's lifecycle: join the DHT, load its span, serve RPCs, announce itself, leave cleanly."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from dataclasses import replace
from functools import partial

import torch

import swarm
from swarm.averaging.statements import signing_key_of
from swarm.dht.announcer import Announcer, store_node_records
from swarm.dht.factory import create_dht
from swarm.dht.reachability import DialBackServicer, probe_reachability
from swarm.dht.swarm_view import read_swarm
from swarm.models.checkpoint import Checkpoint, all_block_hashes, resolve_checkpoint
from swarm.models.span import BlockSpan, load_span
from swarm.node.backend import SpanBackend
from swarm.node.config import AUTO, DETERMINISTIC_THREADS, MAX_MEMORY_FRACTION, NodeConfig
from swarm.node.handler import NodeServicer
from swarm.node.memory import free_memory_bytes, kv_cache_bytes_per_block, loaded_bytes, peak_memory_bytes
from swarm.node.placement import block_throughputs, choose_start, should_move
from swarm.node.quantize import check_quant_name, check_quant_runs, quantize_linears
from swarm.node.relaying import NodeReachability
from swarm.node.throughput import cached_rps, measure_span_rps
from swarm.proto import swarm_pb2
from swarm.testing.faults import Fault, ServingNode
from swarm.utils.aio import run as run_event_loop
from swarm.utils.metrics import MetricsServer
from swarm.utils.tensors import FLOAT_DTYPES
from swarm.verification.determinism import apply_deterministic_profile, determinism_profile
from swarm.verification.service import VerificationServicer

logger = logging.getLogger(__name__)


# a moving node re-checks its move no sooner than this after announcing it (see Node._move)
MOVE_SETTLE_SECONDS = 1.0


class Node:
    """Serves blocks [start, end) of one model until stopped (SIGTERM / SIGINT / stop()).

    `fault`: a --fault for testing defences (see swarm.testing.faults); None when honest.
    """

    def __init__(self, config: NodeConfig, fault: Fault | None = None):
        if config.dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {config.dtype!r}; choose from {list(FLOAT_DTYPES)}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {config.device} requested but CUDA is not available")
        check_quant_name(config.quant)
        if config.max_memory is not None and config.max_memory < 1:
            raise ValueError(f"--max-memory must be positive, got {config.max_memory}")
        self._check_placement(config)
        self.config = config
        self.blocks: tuple[int, int] | None = config.blocks
        self.stop_event: asyncio.Event | None = None
        self.state = swarm_pb2.ServerInfo.JOINING
        self.peer_id: str | None = None
        self.backend: SpanBackend | None = None
        self.block_hashes: list[str] = []
        self.forward_rps = self.inference_rps = 0.0
        self.fault = fault
        self.determinism: dict[str, str] = {}  # the profile announced, read in this node's process
        self.reachability: NodeReachability | None = None  # direct, relayed or unreachable; once started
        self.bytes_per_block = 0  # measured from the loaded span (swarm.node.memory.loaded_bytes)
        self.moving_to: int | None = None  # the start of the span being loaded to move to, announced

    @staticmethod
    def _check_placement(config: NodeConfig) -> None:
        if (config.blocks is None) == (config.num_blocks is None):
            raise ValueError("a node needs either --blocks START:END or --num-blocks N")
        if config.num_blocks is not None and config.num_blocks != AUTO and config.num_blocks < 1:
            raise ValueError(f"--num-blocks must be positive or {AUTO!r}, got {config.num_blocks}")

    def server_info(self, state: int | None = None) -> swarm_pb2.ServerInfo:
        start, end = self.blocks
        throughput = self.config.throughput if self.config.throughput is not None else self.inference_rps
        info = swarm_pb2.ServerInfo(
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
            cache_tokens_left=self.backend.sessions.tokens_left if self.backend is not None else 0,
            block_hashes=self.block_hashes[start:end] if self.block_hashes else ["0" * 64] * (end - start),
            determinism=self.determinism,
            quant=self.config.quant,
            bytes_per_block=self.bytes_per_block,
            moving_to_start=self.moving_to,
        )
        return self.reachability.describe(info) if self.reachability is not None else info

    async def _announce_now(self) -> None:
        """Store this node's record at once, not at the announcer's next period."""
        await asyncio.to_thread(
            store_node_records, self.dht, self.owner_key, self.server_info(), None, self.expiration
        )

    def model_info(self) -> swarm_pb2.ModelInfo:
        config = self.checkpoint.config
        return swarm_pb2.ModelInfo(
            model=self.checkpoint.name,
            architecture=config.model_type,  # a family of swarm.models.families
            num_blocks=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            block_hashes=self.block_hashes,
        )

    def run(self) -> None:
        """Block until stopped; always releases the DHT, the P2P daemon and the compute thread.

        With the deterministic profile on, this pins the whole process's kernels first (threads,
        deterministic algorithms, no TF32): run one node per process.
        """
        threads = self.config.num_threads
        if self.config.is_deterministic:
            apply_deterministic_profile(threads=threads or DETERMINISTIC_THREADS)
        elif threads is not None:
            torch.set_num_threads(threads)  # the compute thread adopts it (adopt_thread_count)
        run_event_loop(self._serve())

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        logger.info("event loop: %s", type(loop).__module__.split(".")[0])
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        config = self.config
        self.checkpoint: Checkpoint = await asyncio.to_thread(
            resolve_checkpoint, config.model, config.cache_dir, config.model_name
        )
        # the attention kernel is part of the profile: the loader set the family's own (sdpa, which
        # verification.determinism.ATTENTION names, except where a family needs eager: Gemma 2's soft-capped
        # attention scores), and every node of a model runs that one
        self.determinism = determinism_profile(
            config.dtype,
            config.device,
            attention=self.checkpoint.config._attn_implementation,
            quant=config.quant,
        )
        logger.info("determinism profile: %s", self.determinism)
        num_blocks = self.checkpoint.num_blocks
        if self.blocks is not None and not 0 <= self.blocks[0] < self.blocks[1] <= num_blocks:
            raise ValueError(
                f"--blocks {self.blocks[0]}:{self.blocks[1]} is outside the model's {num_blocks} blocks"
            )
        if config.num_blocks not in (None, AUTO) and config.num_blocks > num_blocks:
            raise ValueError(f"--num-blocks {config.num_blocks} exceeds the model's {num_blocks} blocks")
        # the DHT forks a process: start it before any weights (or CUDA) are loaded
        # before the DHT: a node nobody can dial runs its DHT as a client (swarm.dht.reachability)
        reachable = await probe_reachability(config.initial_peers, config.host, config.port)
        dht, signer = create_dht(
            config.initial_peers,
            host=config.host,
            port=config.port,
            identity_path=config.identity_path,
            announce_maddrs=config.announce_maddrs,
            relay_service=config.relay_service,
            client_mode=reachable is False,  # nobody could reach its DHT: lookups through it would hang
            listen=True,
        )
        self.p2p = None
        metrics = None
        self._servicers: list = []  # (servicer) registered on p2p, removed on shutdown
        self._tasks: list[asyncio.Task] = []
        self.announcer = None
        try:
            self.peer_id = dht.peer_id.to_base58()
            self.dht, self.owner_key = dht, signer.local_public_key
            self.signing_key = signing_key_of(signer)  # signs what this node says in robust averaging
            self.expiration = max(2 * config.update_period, 3.0)
            self.block_hashes = await asyncio.to_thread(all_block_hashes, self.checkpoint, config.cache_dir)
            self.p2p = await dht.replicate_p2p()
            # before the first record: an unreachable node announces itself so from the start
            self.reachability = NodeReachability(self.p2p, config.initial_peers, reachable, config.use_relay)
            await self.reachability.start()
            self._tasks.append(asyncio.create_task(self.reachability.keep_renewing()))
            # any peer may answer dial-backs; one started with --relay-service says it relays
            relays = config.relay_service is not None and reachable is not False
            await self._add_servicer(DialBackServicer(self.p2p, relay_service=relays))
            await self._join()
            await self._start_serving()
            if config.metrics_port is not None:
                metrics = MetricsServer(
                    self.servicer.metrics.registry, config.metrics_host, config.metrics_port
                )
                logger.info("node %s: metrics at %s", self.peer_id, metrics.url)
            await self.stop_event.wait()
            logger.info("node %s shutting down", self.peer_id)
        finally:
            self.state = swarm_pb2.ServerInfo.OFFLINE
            if metrics is not None:
                metrics.close()
            for task in self._tasks:
                task.cancel()
            if self.announcer is not None:
                await asyncio.to_thread(self._stop_announcer)
            if self.p2p is not None:
                for servicer in self._servicers:
                    await servicer.remove_p2p_handlers(self.p2p)
                await self.p2p.shutdown()
            if self.backend is not None:
                self.backend.shutdown()
            dht.shutdown()

    async def _add_servicer(self, servicer) -> None:
        await servicer.add_p2p_handlers(self.p2p)
        self._servicers.append(servicer)

    async def _join(self) -> None:
        """Pick the span (announcing JOINING), load it and measure its throughput."""
        config = self.config
        await asyncio.to_thread(check_quant_runs, config.quant, FLOAT_DTYPES[config.dtype], config.device)
        if self.config.num_blocks == AUTO:
            self.config = replace(self.config, num_blocks=await asyncio.to_thread(self._blocks_that_fit))
        config = self.config
        if self.blocks is None:
            self.planned_throughput = await asyncio.to_thread(self._estimate_throughput)
            start = await asyncio.to_thread(self._choose_start)
            self.blocks = (start, start + config.num_blocks)
            logger.info("chose blocks [%d, %d) to raise the swarm's bottleneck", *self.blocks)
        start, end = self.blocks
        await self._announce_now()

        self.backend = await asyncio.to_thread(self._load_backend, start, end)
        span, dtype = self.backend.span, self.backend.dtype
        if config.throughput is None:
            self.forward_rps, self.inference_rps = await asyncio.to_thread(
                cached_rps,
                self.checkpoint,
                end - start,
                config.device,
                self._speed_key,
                config.cache_dir,
                partial(measure_span_rps, span, config.device, dtype),
            )
        else:  # told, not measured
            self.forward_rps = self.inference_rps = config.throughput

    async def _start_serving(self) -> None:
        """Register the handlers, go ONLINE, start announcing (and rebalancing)."""
        config, dht = self.config, self.dht
        start, end = self.blocks
        self.servicer = NodeServicer(self.backend, self.server_info, self.model_info())
        self.servicer.p2p = self.p2p  # pushes inference steps to the next node of a chain
        await self._add_servicer(self.servicer)
        # refereed verification (Verde): commit to traced forwards, answer disputes; follows the node's moves
        # it signs its commitments with its identity key, so that a published verdict can prove them its own
        verification = VerificationServicer(
            lambda: self.backend,
            signing_key=self.signing_key,
            model=self.checkpoint.name,
            answer_dispute=self.fault.answer_dispute if self.fault is not None else lambda answer: answer,
        )
        await self._add_servicer(verification)
        self.state = swarm_pb2.ServerInfo.ONLINE
        self.announcer = Announcer(
            dht, self.owner_key, self.server_info, self.model_info(), config.update_period
        )
        self.announcer.start()
        maddrs = " ".join(str(m) for m in dht.get_visible_maddrs())
        logger.info(
            "node %s serving blocks [%d, %d) of %s on %s (%s, %s) at %s",
            self.peer_id,
            start,
            end,
            self.checkpoint.name,
            config.device,
            config.dtype,
            f"{self.inference_rps:.1f} steps/s",
            maddrs,
        )
        if config.num_blocks is not None and config.balance_quality > 0:
            self._tasks.append(asyncio.create_task(self._balance_loop()))
        if self.fault is not None:
            self._start_fault_work()

    def _start_fault_work(self) -> None:
        """Give a --fault its hook once the node serves; whatever it starts stops with the node."""
        work = self.fault.on_serving(
            ServingNode(
                peer_id=self.peer_id,
                model=self.checkpoint.name,
                num_blocks=self.checkpoint.num_blocks,
                dht=self.dht,
                p2p=self.p2p,
                signing_key=self.signing_key,
                owner_public_key=self.owner_key,
                backend=lambda: self.backend,
                determinism=self.determinism,
            )
        )
        if work is not None:
            self._tasks.append(asyncio.create_task(work))

    def _stop_announcer(self) -> None:
        self.announcer.stop(self.server_info())

    def _load_span(self, start: int, end: int) -> BlockSpan:
        """Blocks [start, end) on the configured device, dtype and --quant (quantized block by block)."""
        config = self.config
        dtype = FLOAT_DTYPES[config.dtype]
        quantize = partial(quantize_linears, quant=config.quant, dtype=dtype, device=config.device)
        return load_span(self.checkpoint, start, end, dtype, config.device, prepare_layer=quantize)

    def _load_backend(self, start: int, end: int) -> SpanBackend:
        """Blocks [start, end) loaded on the configured device and dtype, ready to serve."""
        config = self.config
        span = self._load_span(start, end)
        self.bytes_per_block = loaded_bytes(span.layers) // (end - start)
        logger.info(
            "loaded blocks [%d, %d) (--quant %s): %.2f MiB per block; peak memory so far %.1f MiB (%s)",
            start,
            end,
            config.quant,
            self.bytes_per_block / 2**20,
            peak_memory_bytes(config.device) / 2**20,
            "GPU, allocated by torch" if config.device.startswith("cuda") else "resident set",
        )
        if self.fault is not None:
            self.fault.prepare_span(span)
        return SpanBackend(span, config.limits, config.device, FLOAT_DTYPES[config.dtype])

    def _blocks_that_fit(self) -> int:
        """--num-blocks auto: how many blocks fit in --max-memory (default: MAX_MEMORY_FRACTION of the free
        memory), each counted as one block loaded as this node loads it (quantized, measured) plus its share
        of the KV cache at the full --cache-tokens budget."""
        config, model = self.config, self.checkpoint.config
        budget = config.max_memory
        if budget is None:
            budget = int(MAX_MEMORY_FRACTION * free_memory_bytes(config.device))
        weights = loaded_bytes(self._load_span(0, 1).layers)
        cache = kv_cache_bytes_per_block(model, config.limits.cache_tokens, FLOAT_DTYPES[config.dtype])
        fits = min(budget // (weights + cache), self.checkpoint.num_blocks)
        logger.info(
            "--num-blocks auto: %d blocks fit in %.1f MiB (each %.2f MiB of weights, %.2f MiB of KV cache)",
            fits,
            budget / 2**20,
            weights / 2**20,
            cache / 2**20,
        )
        if fits < 1:
            raise ValueError(
                f"--num-blocks auto: not even one block fits in {budget / 2**20:.1f} MiB (one takes "
                f"{weights / 2**20:.2f} MiB of weights and {cache / 2**20:.2f} MiB of KV cache at "
                f"--cache-tokens {config.limits.cache_tokens}); allow more with --max-memory, or lower "
                "--cache-tokens, or use --quant int8/nf4"
            )
        return int(fits)

    # ---- placement and rebalancing ----------------------------------------------------------------------

    @property
    def _speed_key(self) -> str:
        """What the throughput cache tells measurements apart by, beside the model and device."""
        config = self.config
        return config.dtype if config.quant == "none" else f"{config.dtype}-{config.quant}"

    def _estimate_throughput(self) -> float:
        """Steps/s this node would give a span of --num-blocks blocks: told, or measured on one block."""
        config = self.config
        if config.throughput is not None:
            return config.throughput
        dtype = FLOAT_DTYPES[config.dtype]
        per_block = cached_rps(
            self.checkpoint,
            1,
            config.device,
            self._speed_key,
            config.cache_dir,
            lambda: measure_span_rps(self._load_span(0, 1), config.device, dtype),
        )[1]
        return per_block / config.num_blocks

    def _swarm_throughputs(self, tie_break: bool = False) -> list[float]:
        """Others' throughput per block, moves they announced counted where they go (with `tie_break`, only
        those of peers that win a tie against this one: see `block_throughputs`)."""
        servers, _ = read_swarm(self.dht, self.checkpoint.name, self.checkpoint.num_blocks)
        return block_throughputs(
            servers.values(),
            self.checkpoint.num_blocks,
            exclude=self.peer_id,
            moves_yielded_to=self.peer_id if tie_break else None,
        )

    def _choose_start(self) -> int:
        return choose_start(self._swarm_throughputs(), self.config.num_blocks, self.planned_throughput)

    async def _balance_loop(self) -> None:
        """Every balance period (+-50%), move if the swarm would be much better balanced with us elsewhere."""
        config = self.config
        while True:
            delay = config.balance_period * random.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(self.stop_event.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                throughputs = await asyncio.to_thread(self._swarm_throughputs)
                own = self.server_info().throughput
                target = should_move(
                    throughputs, self.blocks[0], config.num_blocks, own, config.balance_quality
                )
                if target is not None:
                    await self._move(target)
            except Exception as e:
                logger.warning("rebalancing failed: %r", e, exc_info=True)

    async def _move(self, new_start: int) -> None:
        """Serve [new_start, new_start + N): announce the move, load the new span, check that the move still
        pays (others may have decided at the same moment), then switch, so no gap opens."""
        config = self.config
        old_start, old_end = self.blocks
        new_end = new_start + config.num_blocks
        logger.info(
            "announcing a move from blocks [%d, %d) to [%d, %d)", old_start, old_end, new_start, new_end
        )
        self.moving_to = new_start
        announced = time.monotonic()
        await self._announce_now()
        # a node that decided at the same moment announced within about one store of ours: its record must
        # be readable before we re-check, however fast the new span loads
        settle_until = announced + max(MOVE_SETTLE_SECONDS, 2 * (time.monotonic() - announced))
        try:
            new_backend = await asyncio.to_thread(self._load_backend, new_start, new_end)
            await asyncio.sleep(max(0.0, settle_until - time.monotonic()))
            throughputs = await asyncio.to_thread(self._swarm_throughputs, True)
            own = self.server_info().throughput
            still = should_move(throughputs, old_start, config.num_blocks, own, config.balance_quality)
        finally:
            self.moving_to = None
        if still != new_start:
            logger.info(
                "calling off the move to [%d, %d): it no longer pays (another node moved or is moving "
                "there); staying on [%d, %d)",
                new_start,
                new_end,
                old_start,
                old_end,
            )
            new_backend.retire(self.blocks)
            await self._announce_now()
            return
        logger.info("moving from blocks [%d, %d) to [%d, %d)", old_start, old_end, new_start, new_end)
        old_backend, self.backend = self.backend, new_backend
        self.servicer.backend = new_backend
        self.blocks = (new_start, new_end)
        await asyncio.to_thread(
            store_node_records,
            self.dht,
            self.owner_key,
            self.server_info(),
            self.model_info(),
            self.expiration,
            extra_blocks=tuple(range(old_start, old_end)),
        )
        # requests in flight on the old span finish; later ones (its sessions' next steps) get
        # UNKNOWN_BLOCKS, and their clients re-route and replay elsewhere
        old_backend.retire(self.blocks)
        logger.info(
            "node %s serving blocks [%d, %d) of %s", self.peer_id, new_start, new_end, self.checkpoint.name
        )
