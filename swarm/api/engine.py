"""Running one completion request on the swarm: generation in a worker thread, its tokens turned into
per-choice text events for the HTTP layer, one inference session per request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import LogitsProcessorList

from swarm.api.choices import ChoiceText, TokenLogprob
from swarm.api.errors import APIError, invalid
from swarm.api.requests import CompletionSpec
from swarm.api.sampling import LogprobRecorder, OpenAIPenalties
from swarm.client.errors import MissingBlocksError, RequestRefused
from swarm.gateway.streaming import TokenQueue


@dataclass(frozen=True)
class APILimits:
    """What one request may ask of the API server."""

    default_max_tokens: int = 256  # when a request names no max_tokens
    max_tokens: int = 2048
    max_concurrent: int = 8  # completions at once; more get 429


@dataclass
class ServedModel:
    """A model the API serves: its swarm client (a DistributedModelForCausalLM) and tokenizer."""

    name: str
    model: object
    tokenizer: object

    @property
    def eos_ids(self) -> set[int]:
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.model.config.eos_token_id
        if eos is None:
            return set()
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


@dataclass
class StepEvent:
    """What one generation step added: per choice, the text to show (maybe empty) and its logprob."""

    deltas: list[tuple[int, str, TokenLogprob | None]]


class StepStreamer(TokenQueue):
    """A streamer that also sends, with each step's tokens, their log-probabilities (when asked for)."""

    def __init__(self, loop, recorder: LogprobRecorder | None, top: int, tokenizer):
        super().__init__(loop)
        self.recorder, self.top, self.tokenizer = recorder, top, tokenizer

    def payload(self, tokens: list[int]) -> tuple[list[int], list[TokenLogprob] | None]:
        if self.recorder is None:
            return tokens, None
        decode = self.tokenizer.decode
        return tokens, [
            TokenLogprob(decode([token]), lp, [(decode([t]), v) for t, v in top])
            for token, (lp, top) in zip(tokens, self.recorder.entries(tokens, self.top), strict=True)
        ]


class Completion:
    """One request: `prompt_ids`, then `events()` yields StepEvents until every choice has finished."""

    def __init__(
        self, served: ServedModel, spec: CompletionSpec, limits: APILimits, threads: ThreadPoolExecutor
    ):
        self.served, self.spec, self.threads = served, spec, threads
        self.prompt_ids = self._prompt_ids()
        self.max_new_tokens = spec.max_tokens if spec.max_tokens is not None else limits.default_max_tokens
        if self.max_new_tokens > limits.max_tokens:
            name = "max_tokens" if spec.kind == "completion" else "max_completion_tokens"
            raise invalid(name, f"at most {limits.max_tokens} here, got {self.max_new_tokens}")
        positions = getattr(served.model.config, "max_position_embeddings", None)
        if positions is not None and len(self.prompt_ids) + self.max_new_tokens > positions:
            self.max_new_tokens = positions - len(self.prompt_ids)
            if self.max_new_tokens < 1:
                raise invalid(
                    "messages" if spec.kind == "chat" else "prompt", f"longer than the model's {positions}"
                )
        self.choices = [ChoiceText(served.tokenizer, spec.stop, served.eos_ids) for _ in range(spec.n)]
        self.prompt_logprobs: list[TokenLogprob] = []

    def _prompt_ids(self) -> list[int]:
        spec, tokenizer = self.spec, self.served.tokenizer
        if spec.kind == "chat":
            try:
                ids = tokenizer.apply_chat_template(
                    spec.messages, add_generation_prompt=True, return_dict=True
                )["input_ids"]
            except Exception as e:  # a template that refuses a role order, for one
                raise invalid("messages", f"the model's chat template refused them: {e}") from None
        elif isinstance(spec.prompt, str):
            ids = tokenizer(spec.prompt)["input_ids"]
        else:
            vocab = self.served.model.config.vocab_size
            if not all(0 <= t < vocab for t in spec.prompt):
                raise invalid("prompt", f"token ids must be within [0, {vocab})")
            ids = list(spec.prompt)
        if not ids:
            raise invalid("prompt" if spec.kind == "completion" else "messages", "has no tokens")
        return [int(t) for t in ids]

    @property
    def prompt_text(self) -> str:
        return self.served.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)

    async def events(self) -> AsyncIterator[StepEvent]:
        """Run the generation; yield what each step adds. Raises APIError for the swarm's refusals. When
        the consumer stops early (a client gone), the generation stops at its next step."""
        loop = asyncio.get_running_loop()
        recorder = LogprobRecorder() if self.spec.logprobs else None
        streamer = StepStreamer(loop, recorder, self.spec.top_logprobs, self.served.tokenizer)
        work = loop.run_in_executor(self.threads, self._generate, streamer, recorder)
        try:
            while True:
                kind, value = await streamer.queue.get()
                if kind == "error":
                    raise _api_error(value)
                if kind == "end":
                    break
                tokens, logprobs = value
                deltas = []
                for index, (choice, token) in enumerate(zip(self.choices, tokens, strict=True)):
                    if not choice.finished:
                        logprob = logprobs[index] if logprobs is not None else None
                        deltas.append((index, choice.add(token, logprob), logprob))
                yield StepEvent(deltas)
                if all(choice.finished for choice in self.choices):
                    break  # every choice met a stop sequence or EOS: no more tokens are needed
            yield StepEvent([(i, choice.finish("length"), None) for i, choice in enumerate(self.choices)])
        finally:
            streamer.cancel()  # the generation stops at its next token and closes its session
            work.add_done_callback(_retrieve)

    def _generate(self, streamer: StepStreamer, recorder: LogprobRecorder | None) -> None:
        """In a worker thread: the whole generation, every step streamed; its end or error reported."""
        streamer.drive(
            lambda: self._run_generation(streamer, recorder),
            expected=(MissingBlocksError, RequestRefused, ValueError),
        )

    def _run_generation(self, streamer: StepStreamer, recorder: LogprobRecorder | None) -> None:
        spec, model = self.spec, self.served.model
        input_ids = torch.tensor([self.prompt_ids] * spec.n, dtype=torch.long)
        if spec.echo and recorder is not None:
            self.prompt_logprobs = self._score_prompt(input_ids[:1])
        processors = LogitsProcessorList()
        if recorder is not None:
            processors.append(recorder)
        if spec.frequency_penalty or spec.presence_penalty:
            processors.append(
                OpenAIPenalties(len(self.prompt_ids), spec.frequency_penalty, spec.presence_penalty)
            )
        generator = torch.Generator()
        if spec.seed is not None:
            generator.manual_seed(spec.seed)
        else:
            generator.seed()
        sampling = spec.temperature > 0
        model.generate(
            input_ids,
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=spec.temperature if sampling else None,
            top_p=spec.top_p if sampling else None,
            streamer=streamer,
            generator=generator,
            logits_processor=processors,
            decoding_loop="swarm",
        )

    def _score_prompt(self, input_ids: torch.Tensor) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the ones before it (echo with logprobs)."""
        with torch.no_grad():
            logprobs = torch.log_softmax(self.served.model(input_ids).logits[0].float(), dim=-1)
        decode, top = self.served.tokenizer.decode, self.spec.top_logprobs
        scored = [TokenLogprob(decode([self.prompt_ids[0]]), None)]
        for position, token in enumerate(self.prompt_ids[1:]):
            row = logprobs[position]
            best = []
            if top:
                values, indices = row.topk(top)
                best = [(decode([t]), v) for t, v in zip(indices.tolist(), values.tolist(), strict=True)]
            scored.append(TokenLogprob(decode([token]), float(row[token]), best))
        return scored

    @property
    def usage(self) -> dict:
        completion = sum(choice.num_tokens for choice in self.choices)
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # errors went to the stream already


def _api_error(error: BaseException) -> APIError:
    """The OpenAI error a generation's failure is reported with."""
    if isinstance(error, MissingBlocksError):
        return APIError(503, f"{error}: no node of the swarm serves them now", code="blocks_missing")
    if isinstance(error, RequestRefused):
        return APIError(429, f"the swarm refused the request for now: {error}", code="swarm_busy")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}")
