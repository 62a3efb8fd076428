"""Tokens from a generation thread to an async consumer, and the text they add as they come."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


class GenerationCancelled(Exception):
    """The consumer went away: raised inside generate() so that it stops and closes its session."""


class TokenQueue:
    """A transformers streamer (`put`, `end`) that hands each step's tokens to an asyncio consumer.

    generate() calls `put` from its thread: first with the prompt (skipped), then with each step's tokens.
    `cancel()` (from the consumer's side) makes the next `put` raise GenerationCancelled, which ends the
    generation where it is; generate() then closes its inference session, freeing the nodes' caches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise GenerationCancelled
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._send("tokens", self.payload([int(token) for token in value.reshape(-1).tolist()]))

    def payload(self, tokens: list[int]) -> Any:
        """What the consumer gets for one step's tokens (subclasses add to them)."""
        return tokens

    def drive(self, generate: Callable[[], object], expected: tuple[type[BaseException], ...] = ()) -> None:
        """In a worker thread: run `generate` (which streams into this queue); report its end or its error
        to the consumer. A cancelled generation ends quietly; errors not in `expected` are also logged."""
        try:
            generate()
        except GenerationCancelled:
            return
        except BaseException as e:
            if not isinstance(e, expected):
                logger.warning("generation failed: %r", e, exc_info=True)
            self.fail(e)
            return
        self.end()

    def end(self) -> None:
        self._send("end", None)

    def fail(self, error: BaseException) -> None:
        """Pass the generation's error to the consumer (called by the thread running generate())."""
        self._send("error", error)

    def cancel(self) -> None:
        self.cancelled.set()

    def _send(self, kind: str, value: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))


class IncrementalText:
    """The text each new token adds to a sequence's decoding, held back while a character is incomplete.

    Decodes the whole sequence each time (tokenizers merge bytes and spaces across tokens, so tokens can't be
    decoded one by one); special tokens are skipped, as `swarm generate` prints them. Without a tokenizer
    (None) there is no text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        if self.tokenizer is None:  # a model without a tokenizer: tokens only
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for its end
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character included)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.emitted = text[self.emitted :], len(text)
        return delta
