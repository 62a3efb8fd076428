"""One choice's text as its tokens arrive: stop sequences cut it (and are never shown, even in part), EOS
ends it, and each token's log-probability is kept in OpenAI's shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first token of an echoed prompt: nothing comes before it
    top: list[tuple[str, float]] = field(default_factory=list)


class ChoiceText:
    """The text a choice shows so far. `add` returns what a token adds that is safe to show: text that
    could still turn into a stop sequence, or an incomplete character, is held back until it can't."""

    def __init__(self, tokenizer, stops: list[str], eos_ids: set[int]):
        self.tokenizer, self.stops, self.eos_ids = tokenizer, stops, eos_ids
        self.ids: list[int] = []
        self.text = ""  # the text shown so far
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self._decoded = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def add(self, token: int, logprob: TokenLogprob | None = None) -> str:
        if self.finished:
            return ""
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self._show(len(self._decoded))
        searched_to = len(self._decoded)
        self._decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(searched_to)
        if cut is not None:
            self.finish_reason = "stop"
            return self._show(cut)
        if self._decoded.endswith("\ufffd"):  # a character split across tokens: wait for its end
            return ""
        return self._show(len(self._decoded) - self._partial_stop())

    def finish(self, reason: str) -> str:
        """End the choice (when generation ended without a stop); returns the text held back."""
        if self.finished:
            return ""
        self.finish_reason = reason
        return self._show(len(self._decoded))

    def _show(self, end: int) -> str:
        delta = self._decoded[len(self.text) : end] if end > len(self.text) else ""
        self.text += delta
        return delta

    def _first_stop(self, searched_to: int) -> int | None:
        found = []
        for stop in self.stops:
            index = self._decoded.find(stop, max(0, searched_to - len(stop) + 1))
            if index >= 0:
                found.append(index)
        return min(found) if found else None

    def _partial_stop(self) -> int:
        """The length of the longest end of the text that begins some stop sequence."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self._decoded)), longest, -1):
                if self._decoded.endswith(stop[:length]):
                    longest = length
                    break
        return longest
