"""The gRPC gateway: `swarm.gateway.Gateway` (proto/gateway.proto) over one shared swarm client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from swarm.client.errors import MissingBlocksError, RequestRefused
from swarm.gateway.metrics import GatewayMetrics
from swarm.gateway.streaming import IncrementalText, TokenQueue
from swarm.proto import gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True)
class GatewayLimits:
    """What one request may ask of the gateway."""

    default_max_new_tokens: int = 64  # when a request leaves max_new_tokens at 0
    max_new_tokens: int = 1024
    max_concurrent: int = 8  # generations at once; more get RESOURCE_EXHAUSTED
    health_timeout: float = 10.0  # seconds to read the swarm map from the DHT


class BadRequest(ValueError):
    """A request the gateway refuses as it is (INVALID_ARGUMENT)."""


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    """Serves generation and the swarm map for one model.

    :param model: a `DistributedModelForCausalLM`, shared by every request (each generation opens its own
      inference session through it)
    :param tokenizer: the model's tokenizer (prompts and text); None serves input_ids only, with no text
    """

    def __init__(self, model, tokenizer, limits: GatewayLimits | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or GatewayLimits()
        self._threads = ThreadPoolExecutor(self.limits.max_concurrent, thread_name_prefix="gateway-generate")
        self._running = 0
        self.metrics = GatewayMetrics(lambda: self._running)

    def close(self) -> None:
        """Cancel queued work; generations in progress end at their next token (their streams are gone)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ---- Generate -----------------------------------------------------------------------------------------

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        started, outcome = time.perf_counter(), "CANCELLED"  # unless it ends otherwise
        try:
            async for response in self._generate_stream(request, context, started):
                yield response
            outcome = "OK"
        except grpc.aio.AbortError:
            outcome = context.code().name if context.code() is not None else "UNKNOWN"
            raise
        finally:
            self.metrics.requests.labels("Generate", outcome).inc()
            self.metrics.latency.labels("Generate").observe(time.perf_counter() - started)

    async def _generate_stream(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext, started: float
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            input_ids, kwargs = self._parse(request)
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self._running >= self.limits.max_concurrent:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway is generating for {self._running} requests already; try again shortly",
            )
        self._running += 1
        loop = asyncio.get_running_loop()
        tokens = TokenQueue(loop)
        generation = loop.run_in_executor(self._threads, self._generate, input_ids, kwargs, tokens)
        text = IncrementalText(self.tokenizer)
        eos = self._eos_ids()
        last: list[int] = []
        try:
            while True:
                kind, value = await tokens.queue.get()
                if kind == "error":
                    code, message = _status_of(value)
                    await context.abort(code, message)
                if kind == "end":
                    break
                if not last:
                    self.metrics.first_token.observe(time.perf_counter() - started)
                last = value
                self.metrics.tokens.inc(len(value))
                yield gateway_pb2.GenerateResponse(token_ids=value, text=text.add(value))
            reason = "stop" if last and last[-1] in eos else "length"
            yield gateway_pb2.GenerateResponse(text=text.flush(), finished=True, finish_reason=reason)
        finally:
            # the client went away (or the stream ended): the generation stops at its next token and
            # closes its session; we don't wait for it here
            tokens.cancel()
            generation.add_done_callback(self._generation_done)

    def _generation_done(self, future: asyncio.Future) -> None:
        self._running -= 1
        if not future.cancelled():
            future.exception()  # retrieved: errors were passed to the stream already

    def _generate(self, input_ids: torch.Tensor, kwargs: dict, tokens: TokenQueue) -> None:
        """In a worker thread: run generate() with `tokens` as its streamer; report its end or error."""
        tokens.drive(
            lambda: self.model.generate(input_ids, streamer=tokens, **kwargs),
            expected=(MissingBlocksError, RequestRefused, ValueError),
        )

    def _parse(self, request: gateway_pb2.GenerateRequest) -> tuple[torch.Tensor, dict]:
        """(input_ids of shape (1, n), generate() keyword arguments); raises BadRequest."""
        if bool(request.prompt) == bool(request.input_ids):
            raise BadRequest("give exactly one of prompt and input_ids")
        vocab = self.model.config.vocab_size
        if request.prompt and self.tokenizer is None:
            raise BadRequest("this gateway's model has no tokenizer: send input_ids")
        if request.prompt:
            if request.chat:
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": request.prompt}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                )["input_ids"]
            else:
                ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise BadRequest("the prompt has no tokens")
        else:
            if request.chat:
                raise BadRequest("chat applies to a text prompt, not to input_ids")
            if not all(0 <= token < vocab for token in request.input_ids):
                raise BadRequest(f"input_ids must be within [0, {vocab})")
            ids = torch.tensor([list(request.input_ids)], dtype=torch.long)
        max_new = request.max_new_tokens or self.limits.default_max_new_tokens
        if max_new > self.limits.max_new_tokens:
            raise BadRequest(f"max_new_tokens is at most {self.limits.max_new_tokens} here, got {max_new}")
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and ids.shape[1] + max_new > positions:
            raise BadRequest(
                f"{ids.shape[1]} prompt tokens and {max_new} new ones exceed the model's {positions}"
            )
        kwargs: dict = {"max_new_tokens": max_new, "do_sample": request.do_sample}
        if request.HasField("temperature"):
            if not request.temperature > 0:  # NaN too
                raise BadRequest(f"temperature must be > 0, got {request.temperature}")
            kwargs["temperature"] = request.temperature
        if request.HasField("top_k"):
            kwargs["top_k"] = request.top_k
        if request.HasField("top_p"):
            if not 0 < request.top_p <= 1:
                raise BadRequest(f"top_p must be within (0, 1], got {request.top_p}")
            kwargs["top_p"] = request.top_p
        if request.HasField("seed"):
            kwargs["generator"] = torch.Generator().manual_seed(request.seed)
        return ids, kwargs

    def _eos_ids(self) -> set[int]:
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = self.model.config.eos_token_id
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}

    # ---- Health -------------------------------------------------------------------------------------------

    async def Health(
        self, request: gateway_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.HealthResponse:
        started = time.perf_counter()
        swarm_map = await asyncio.to_thread(self.swarm_map)
        self.metrics.requests.labels("Health", "OK").inc()
        self.metrics.latency.labels("Health").observe(time.perf_counter() - started)
        response = gateway_pb2.HealthResponse(
            model=swarm_map["model"],
            num_blocks=swarm_map["num_blocks"],
            missing=swarm_map["missing"],
            complete=swarm_map["num_blocks"] > 0 and not swarm_map["missing"],
            json=json.dumps(swarm_map),
        )
        for node in swarm_map["nodes"]:
            response.nodes.add(
                peer_id=node["peer_id"],
                start=node["start"],
                end=node["end"],
                state=node["state"],
                throughput=node["throughput"],
                cache_tokens_left=node.get("cache_tokens_left", 0),
                banned=node.get("banned", False),
            )
        return response

    def swarm_map(self) -> dict:
        """The model's map, as `swarm health --json` prints it (verdicts re-checked with local blocks)."""
        from swarm.dht.swarm_map import model_map

        swarm = self.model.swarm
        return model_map(
            swarm.dht,
            swarm.model_name,
            self.limits.health_timeout,
            lambda block: self.model.local_span(block, block + 1),
        )


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a generation's error is reported with."""
    if isinstance(error, MissingBlocksError):
        return grpc.StatusCode.UNAVAILABLE, f"{error}: no node of the swarm serves them now"
    if isinstance(error, RequestRefused):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"generation failed: {type(error).__name__}: {error}"


async def serve(service: GatewayService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server for `service` on host:port (0: any free port); returns (server, bound port)."""
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"can't listen on {host}:{port}")
    await server.start()
    return server, bound
