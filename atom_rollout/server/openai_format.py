"""Token ids -> the pieces of OpenAI responses: text, token strings, logprobs objects."""
from __future__ import annotations

import json

from ..engine.protocol import SampleDelta


class TokenText:
    """Token strings and text for one request; without a tokenizer every token is
    written as ``token_id:<id>`` and text is empty."""

    def __init__(self, tokenizer, as_token_ids: bool):
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids or tokenizer is None

    def token(self, token_id: int) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def text(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class Detokenizer:
    """Incremental text of a growing token list; holds back an incomplete UTF-8 tail."""

    def __init__(self, text: TokenText):
        self._text = text
        self.token_ids: list[int] = []
        self.sent = 0

    def feed(self, token_ids: list[int], final: bool) -> str:
        self.token_ids.extend(token_ids)
        text = self._text.text(self.token_ids)
        if text.endswith("\ufffd") and not final:
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new


def completion_logprobs(text: TokenText, delta: SampleDelta, offset: int) -> dict:
    """The legacy completions ``logprobs`` object; top_logprobs holds the k best of the
    processed distribution and the sampled token."""
    tokens = [text.token(t) for t in delta.token_ids]
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    top = []
    for i, (token_id, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
        entry = {text.token(t): lp for t, lp in (delta.top_logprobs or [[]] * (i + 1))[i]}
        entry.setdefault(tokens[i], logprob)
        top.append(entry)
    return {"tokens": tokens, "token_logprobs": list(delta.logprobs), "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(text: TokenText, delta: SampleDelta) -> dict:
    content = []
    for i, (token_id, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
        alternatives = (delta.top_logprobs or [[]] * (i + 1))[i]
        content.append({**_chat_token(text, token_id, logprob),
                        "top_logprobs": [_chat_token(text, t, lp) for t, lp in alternatives]})
    return {"content": content}


def _chat_token(text: TokenText, token_id: int, logprob: float) -> dict:
    token = text.token(token_id)
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
