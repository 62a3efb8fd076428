"""The OpenAI-compatible HTTP API as an ASGI app (Starlette): `/v1/models`, `/v1/chat/completions`,
`/v1/completions`, with OpenAI's JSON shapes, server-sent event streams and error objects."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from swarm.api import responses
from swarm.api.engine import APILimits, Completion, ServedModel, StepEvent
from swarm.api.errors import APIError, error_response
from swarm.api.requests import CompletionSpec, parse_request

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT = 10.0  # seconds to read a model's map from the DHT


class APIServer:
    """Serves `models` (by their names in the DHT) to OpenAI clients; every request shares their swarm
    clients, and each completion has its own inference session, closed when it ends or its client goes."""

    def __init__(
        self, models: list[ServedModel], limits: APILimits | None = None, api_key: str | None = None
    ):
        self.models = {served.name: served for served in models}
        self.limits = limits or APILimits()
        self.api_key = api_key
        self.running = 0
        self.threads = ThreadPoolExecutor(self.limits.max_concurrent, thread_name_prefix="api-generate")
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )

    def close(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)

    # ---- models -------------------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        if (refused := self._refuse_key(request)) is not None:
            return refused
        cards = await asyncio.gather(*(self._model_card(served) for served in self.models.values()))
        complete = [card for card in cards if not card["swarm"]["missing_blocks"]]
        return JSONResponse({"object": "list", "data": complete})

    async def get_model(self, request: Request) -> Response:
        if (refused := self._refuse_key(request)) is not None:
            return refused
        served = self.models.get(request.path_params["model_id"])
        if served is None:
            return _unknown_model(request.path_params["model_id"]).response()
        return JSONResponse(await self._model_card(served))

    async def _model_card(self, served: ServedModel) -> dict:
        """OpenAI's model object, with the swarm's coverage of the model's blocks in `swarm`."""
        from swarm.dht.swarm_map import model_map

        swarm_map = await asyncio.to_thread(model_map, served.model.swarm.dht, served.name, HEALTH_TIMEOUT)
        online = [node for node in swarm_map["nodes"] if node["state"] == "ONLINE"]
        num_blocks = served.model.num_blocks
        # a model no node has announced has no map at all: every block is missing
        missing = swarm_map["missing"] if swarm_map["num_blocks"] else list(range(num_blocks))
        return {
            "id": served.name,
            "object": "model",
            "created": 0,
            "owned_by": "swarm",
            "swarm": {"num_blocks": num_blocks, "missing_blocks": missing, "nodes": len(online)},
        }

    # ---- completions --------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    async def _complete(self, request: Request, kind: str) -> Response:
        if (refused := self._refuse_key(request)) is not None:
            return refused
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            spec = parse_request(kind, body)
            served = self.models.get(spec.model)
            if served is None:
                raise _unknown_model(spec.model)
            if self.running >= self.limits.max_concurrent:
                raise APIError(
                    429, f"the server is completing {self.running} requests already; try again shortly"
                )
            completion = Completion(served, spec, self.limits, self.threads)
        except APIError as e:
            return e.response()
        self.running += 1
        events = completion.events()
        if not spec.stream:
            try:
                async for _ in events:
                    pass
            except APIError as e:
                return e.response()
            finally:
                self.running -= 1
            return JSONResponse(_whole_response(spec, completion))
        try:
            first = await anext(
                events
            )  # the status goes out with the first step: errors before it are errors
        except APIError as e:
            self.running -= 1
            return e.response()
        except BaseException:
            self.running -= 1
            await events.aclose()
            raise
        return StreamingResponse(
            self._stream(spec, completion, first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(
        self, spec: CompletionSpec, completion: Completion, first: StepEvent, events: AsyncIterator[StepEvent]
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that goes
        away cancels this generator; closing `events` then ends the generation and its session."""
        chunks = _Chunks(spec, completion)
        try:
            for chunk in chunks.opening():
                yield _event(chunk)
            event: StepEvent | None = first
            while event is not None:
                for chunk in chunks.step(event):
                    yield _event(chunk)
                event = await anext(events, None)
            if spec.include_usage:
                yield _event(chunks.usage())
        except APIError as e:  # after the first step the status is sent: the error goes in the stream
            yield _event(e.body())
        finally:
            self.running -= 1
            await events.aclose()
        yield "data: [DONE]\n\n"

    def _refuse_key(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return error_response(
                401, "no API key: send it as 'Authorization: Bearer KEY'", code="missing_api_key"
            )
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return error_response(401, "incorrect API key", code="invalid_api_key")
        return None


class _Chunks:
    """The streamed chunks of one completion, chat or text."""

    def __init__(self, spec: CompletionSpec, completion: Completion):
        self.spec, self.completion = spec, completion
        self.id = _completion_id(spec)
        self.created = int(time.time())
        self.announced: set[int] = set()  # choices whose finish_reason was sent

    def _chunk(self, choices: list[dict]) -> dict:
        chat = self.spec.kind == "chat"
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": self.spec.model,
            "choices": choices,
        }
        if chat:
            chunk["system_fingerprint"] = None
        if self.spec.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[dict]:
        n = self.spec.n
        if self.spec.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            return [self._chunk([responses.chat_chunk_choice(i, delta, None, None)]) for i in range(n)]
        if not self.spec.echo:
            return []
        logprobs = None
        if self.spec.logprobs:
            logprobs = responses.completion_logprobs(self.completion.prompt_logprobs)
        text = self.completion.prompt_text
        return [self._chunk([responses.completion_choice(i, text, None, logprobs)]) for i in range(n)]

    def step(self, event: StepEvent) -> list[dict]:
        chunks = []
        for index, text, logprob in event.deltas:
            choice = self.completion.choices[index]
            if text or logprob is not None:
                if self.spec.kind == "chat":
                    chunks.append(
                        self._chunk([responses.chat_chunk_choice(index, {"content": text}, None, logprob)])
                    )
                else:
                    logprobs = responses.completion_logprobs([logprob]) if logprob is not None else None
                    chunks.append(self._chunk([responses.completion_choice(index, text, None, logprobs)]))
            if choice.finished and index not in self.announced:
                self.announced.add(index)
                if self.spec.kind == "chat":
                    end = responses.chat_chunk_choice(index, {}, choice.finish_reason, None)
                else:
                    end = responses.completion_choice(index, "", choice.finish_reason, None)
                chunks.append(self._chunk([end]))
        return chunks

    def usage(self) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self.completion.usage
        return chunk


def _whole_response(spec: CompletionSpec, completion: Completion) -> dict:
    choices = []
    for index, choice in enumerate(completion.choices):
        if spec.kind == "chat":
            logprobs = choice.logprobs if spec.logprobs else None
            choices.append(responses.chat_choice(index, choice.text, choice.finish_reason, logprobs))
            continue
        text, logprobs = choice.text, None
        if spec.echo:
            text = completion.prompt_text + text
        if spec.logprobs:
            entries = (completion.prompt_logprobs if spec.echo else []) + choice.logprobs
            logprobs = responses.completion_logprobs(entries)
        choices.append(responses.completion_choice(index, text, choice.finish_reason, logprobs))
    response = {
        "id": _completion_id(spec),
        "object": "chat.completion" if spec.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": spec.model,
        "choices": choices,
        "usage": completion.usage,
    }
    if spec.kind == "chat":
        response["system_fingerprint"] = None
    return response


def _completion_id(spec: CompletionSpec) -> str:
    return ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} is not served here", param="model", code="model_not_found")


async def _http_error(request: Request, error: HTTPException) -> Response:
    return error_response(error.status_code, error.detail or "not found")


async def _internal_error(request: Request, error: Exception) -> Response:
    logger.warning("request to %s failed: %r", request.url.path, error, exc_info=True)
    return error_response(500, f"internal error: {type(error).__name__}")
