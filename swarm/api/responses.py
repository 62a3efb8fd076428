"""OpenAI's JSON shapes for completions and chat completions: whole responses and streamed chunks."""

from __future__ import annotations

from swarm.api.choices import TokenLogprob


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": list(entry.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
                    for token, logprob in entry.top
                ],
            }
            for entry in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The legacy completions format (the first token of an echoed prompt has a null logprob)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for token, logprob in entry.top:  # most likely first: tokens that decode alike keep the best
            top.setdefault(token, logprob)
        top_logprobs.append(top or None)
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_choice(index: int, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
        "finish_reason": finish_reason,
    }


def chat_chunk_choice(
    index: int, delta: dict, finish_reason: str | None, logprob: TokenLogprob | None
) -> dict:
    return {
        "index": index,
        "delta": delta,
        "logprobs": chat_logprobs([logprob]) if logprob is not None else None,
        "finish_reason": finish_reason,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
