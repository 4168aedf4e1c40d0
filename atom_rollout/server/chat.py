"""/v1/chat/completions: the model directory's chat template, then one engine request."""
from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.async_engine import AsyncRolloutEngine
from .errors import exception_body
from .fanout import generate_all, stream_all, until_disconnected
from .openai_format import Detokenizer, TokenText, chat_logprobs, sse_event, usage
from .schemas import ChatRequest


def chat_prompt_ids(engine: AsyncRolloutEngine, body: ChatRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: the model directory's tokenizer has no chat template")
    try:
        ids = tokenizer.apply_chat_template(
            body.messages, add_generation_prompt=body.add_generation_prompt, tokenize=True,
            return_dict=False, **(body.chat_template_kwargs or {}))
    except Exception as e:  # jinja errors, bad message shapes
        raise ValueError(f"messages: the chat template failed: {e}") from None
    return engine.prompt_ids(list(ids), "messages")


async def create_chat_completion(engine: AsyncRolloutEngine, model: str, body: ChatRequest,
                                 request: Request):
    prompt = chat_prompt_ids(engine, body)
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.max_model_len
    top = body.top_logprobs if body.logprobs else None
    params = body.sampling_params(max_tokens, top)
    text = TokenText(engine.tokenizer, body.return_tokens_as_token_ids)
    header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if body.stream:
        return StreamingResponse(_stream(engine, prompt, params, body, text, header),
                                 media_type="text/event-stream")
    out = (await until_disconnected(request, generate_all(engine, [prompt], params)))[0]
    choices = [{"index": j, "message": {"role": "assistant",
                                        "content": text.text(sample.token_ids)},
                "logprobs": chat_logprobs(text, sample) if body.logprobs else None,
                "finish_reason": sample.finish_reason, "stop_reason": None,
                "prompt_token_ids": prompt, "token_ids": sample.token_ids}
               for j, sample in enumerate(out.samples)]
    completion_tokens = sum(len(s.token_ids) for s in out.samples)
    # prompt_token_ids also at the top level: TRL's VLLMClient.chat reads it there
    return {**header, "object": "chat.completion", "choices": choices,
            "prompt_token_ids": prompt, "usage": usage(len(prompt), completion_tokens)}


async def _stream(engine, prompt, params, body: ChatRequest, text: TokenText, header: dict):
    header = {**header, "object": "chat.completion.chunk"}
    detokenizers, completion_tokens = {}, 0
    try:
        async for _, delta in stream_all(engine, [prompt], params):
            index = delta.sample_index
            if index not in detokenizers:
                detokenizers[index] = Detokenizer(text)
                yield sse_event({**header, "choices": [{
                    "index": index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None, "prompt_token_ids": prompt}]})
            completion_tokens += len(delta.token_ids)
            content = detokenizers[index].feed(delta.token_ids, delta.finished)
            yield sse_event({**header, "choices": [{
                "index": index, "delta": {"content": content},
                "logprobs": chat_logprobs(text, delta) if body.logprobs else None,
                "finish_reason": delta.finish_reason, "token_ids": delta.token_ids}]})
        if body.include_usage:
            yield sse_event({**header, "choices": [],
                          "usage": usage(len(prompt), completion_tokens)})
    except Exception as e:
        yield sse_event(exception_body(e)[1])
    yield "data: [DONE]\n\n"
