"""/v1/completions: text or token-id prompts, n samples each, choices prompt-major."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.async_engine import AsyncRolloutEngine
from .errors import exception_body
from .fanout import generate_all, stream_all, until_disconnected
from .openai_format import Detokenizer, TokenText, completion_logprobs, sse_event, usage
from .schemas import CompletionRequest


async def create_completion(engine: AsyncRolloutEngine, model: str, body: CompletionRequest,
                            request: Request, tokenizer):
    given = body.prompts()
    prompts = [engine.prompt_ids(p, f"prompt[{i}]" if len(given) > 1 else "prompt")
               for i, p in enumerate(given)]
    params = body.sampling_params(body.max_tokens or 16, body.logprobs)
    text = TokenText(tokenizer, body.return_tokens_as_token_ids)
    header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
              "created": int(time.time()), "model": model}
    if body.stream:
        return StreamingResponse(_stream(engine, prompts, params, body, text, header),
                                 media_type="text/event-stream")
    outs = await until_disconnected(request, generate_all(engine, prompts, params))
    choices, completion_tokens = [], 0
    for p, out in enumerate(outs):
        for j, sample in enumerate(out.samples):
            completion_tokens += len(sample.token_ids)
            choices.append({
                "index": p * params.n + j, "text": text.text(sample.token_ids),
                "logprobs": completion_logprobs(text, sample, 0)
                if body.logprobs is not None else None,
                "finish_reason": sample.finish_reason, "stop_reason": None,
                "prompt_token_ids": out.prompt_token_ids, "token_ids": sample.token_ids})
    return {**header, "choices": choices,
            "usage": usage(sum(map(len, prompts)), completion_tokens)}


async def _stream(engine, prompts, params, body: CompletionRequest, text: TokenText,
                  header: dict):
    detokenizers, completion_tokens = {}, 0
    try:
        async for p, delta in stream_all(engine, prompts, params):
            index = p * params.n + delta.sample_index
            first = index not in detokenizers
            detok = detokenizers.setdefault(index, Detokenizer(text))
            offset = detok.sent
            completion_tokens += len(delta.token_ids)
            choice = {"index": index, "text": detok.feed(delta.token_ids, delta.finished),
                      "logprobs": completion_logprobs(text, delta, offset)
                      if body.logprobs is not None else None,
                      "finish_reason": delta.finish_reason, "stop_reason": None,
                      "token_ids": delta.token_ids}
            if first:
                choice["prompt_token_ids"] = prompts[p]
            yield sse_event({**header, "choices": [choice]})
        if body.include_usage:
            yield sse_event({**header, "choices": [],
                          "usage": usage(sum(map(len, prompts)), completion_tokens)})
    except Exception as e:
        yield sse_event(exception_body(e)[1])
    yield "data: [DONE]\n\n"
