"""Reading OpenAI request bodies into one `CompletionSpec`, refusing bad fields by name (a 400)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from swarm.api.errors import APIError, invalid

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}
CHAT_ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class CompletionSpec:
    """What one chat completion or completion asks for, checked."""

    kind: str  # "chat" or "completion"
    model: str
    max_tokens: int | None  # None: the server's default
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    messages: list[dict] | None = None  # chat: role and text of each message
    prompt: str | list[int] | None = None  # completion: text or token ids


def parse_request(kind: str, body) -> CompletionSpec:
    """A `CompletionSpec` from a chat completions (`kind="chat"`) or completions request body."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "a model name is required")
    spec = CompletionSpec(kind=kind, model=model, max_tokens=_max_tokens(body, kind))
    spec.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    spec.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    spec.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    spec.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    spec.n = _integer(body, "n", 1, 1, MAX_CHOICES)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise invalid("seed", f"must be a non-negative integer, got {seed!r}")
    spec.seed = seed
    spec.stop = _stop(body.get("stop"))
    spec.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options", "must be an object")
        if not spec.stream:
            raise invalid("stream_options", "is only allowed with stream: true")
        spec.include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    if kind == "chat":
        spec.messages = _messages(body.get("messages"))
        spec.logprobs = _boolean(body, "logprobs")
        spec.top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS["chat"])
        if spec.top_logprobs and not spec.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
    else:
        spec.prompt = _prompt(body.get("prompt"))
        spec.echo = _boolean(body, "echo")
        if body.get("logprobs") is not None:
            spec.logprobs = True
            spec.top_logprobs = _integer(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS["completion"])
    return spec


def _max_tokens(body: dict, kind: str) -> int | None:
    names = ["max_completion_tokens", "max_tokens"] if kind == "chat" else ["max_tokens"]
    for name in names:
        if body.get(name) is not None:
            return _integer(body, name, None, 1, None)
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, default, low: int, high: int | None, param: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"within [{low}, {high}]"
        raise invalid(param or name, f"must be an integer {bounds}, got {value!r}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(name, f"must be a number, got {value!r}")
    if value > high or value < low or (low_open and value <= low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(name, f"must be within {interval}, got {value}")
    return float(value)


def _boolean(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(param or name, f"must be true or false, got {value!r}")
    return value


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    return stops


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(param, "must be an object with a role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{param}.role", f"must be one of {sorted(CHAT_ROLES)}, got {role!r}")
        messages.append(
            {"role": "system" if role == "developer" else role, "content": _content(message, param)}
        )
    return messages


def _content(message: dict, param: str) -> str:
    """A message's text: a string, or a list of text parts (other part types are refused)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(f"{param}.content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(f"{param}.content", "must be a string or a list of text parts")


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return value
    raise invalid("prompt", "must be a string or a list of token ids (one prompt per request)")
