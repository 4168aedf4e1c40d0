"""The OpenAI-compatible server, through the official `openai` client and raw HTTP."""
import json

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from server_util import running_server  # noqa: E402



@pytest.fixture(scope="module")
def engine(served_checkpoint):
    from atom_rollout.engine.async_engine import AsyncRolloutEngine
    engine = AsyncRolloutEngine(served_checkpoint, num_kv_blocks=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    from atom_rollout.server import build_app
    with running_server(build_app(engine, "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion_text_prompt_with_logprobs(client, engine):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, n=2, seed=0,
                                    logprobs=2, extra_body={"top_k": 20, "min_p": 0.01,
                                                            "return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        ids = choice.model_extra["token_ids"]
        assert choice.model_extra["prompt_token_ids"] == engine.tokenizer.encode("Hello")
        assert 1 <= len(ids) <= 8 and choice.finish_reason in ("stop", "length")
        assert len(choice.logprobs.token_logprobs) == len(ids)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
        assert choice.text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"])
                                              for c in out.choices)


def test_token_prompts_are_prompt_major(client):
    prompts = [[1, 5, 6], [1, 7, 8, 9]]
    out = client.completions.create(model="tiny", prompt=prompts, n=3, max_tokens=4, seed=1)
    assert [c.index for c in out.choices] == list(range(6))
    assert [c.model_extra["prompt_token_ids"] for c in out.choices] == [prompts[0]] * 3 + \
        [prompts[1]] * 3
    # a seeded request gives the same samples alone as in a batch
    alone = client.completions.create(model="tiny", prompt=prompts[1], n=3, max_tokens=4,
                                      seed=1)
    assert [c.model_extra["token_ids"] for c in alone.choices] == \
        [c.model_extra["token_ids"] for c in out.choices[3:]]


def test_streamed_completion_matches_unstreamed(client):
    kwargs = dict(model="tiny", prompt=[1, 10, 11, 12], n=2, max_tokens=10, seed=7,
                  logprobs=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    ids, logprobs, finish = {0: [], 1: []}, {0: [], 1: []}, {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            ids[c.index] += c.model_extra["token_ids"]
            logprobs[c.index] += c.logprobs.token_logprobs
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    for choice in whole.choices:
        assert ids[choice.index] == choice.model_extra["token_ids"]
        assert logprobs[choice.index] == pytest.approx(choice.logprobs.token_logprobs)
        assert finish[choice.index] == "length"


def test_tokens_as_token_ids(client):
    out = client.completions.create(model="tiny", prompt=[1, 5], max_tokens=3, logprobs=1,
                                    extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.model_extra["token_ids"]]


def test_chat_completion_and_stream(client, engine):
    messages = [{"role": "user", "content": "Say hi"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=6, seed=3, logprobs=True,
                  top_logprobs=2)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    ids = choice.model_extra["token_ids"]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(choice.logprobs.content) == len(ids)
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    assert choice.model_extra["prompt_token_ids"] == list(prompt)
    assert whole.model_extra["prompt_token_ids"] == list(prompt)  # where TRL reads it
    text, streamed_ids = "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.delta.content or ""
            streamed_ids += c.model_extra.get("token_ids") or []
    assert (text, streamed_ids) == (choice.message.content, ids)


@pytest.mark.parametrize("body, field", [
    ({"prompt": [1, 2], "n": 0}, "n"),
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
    ({"prompt": [1, 2], "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"prompt": [1, 2], "stop": ["x"]}, "stop"),
    ({"prompt": [1, 1000]}, "prompt"),
    ({"prompt": [[1], [2, 5000]]}, "prompt[1]"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": "many"}, "max_tokens"),
    ({"prompt": [1] * 300}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(url, body, field):
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith(field), response.text


def test_malformed_json_and_server_keeps_serving(url):
    response = httpx.post(f"{url}/v1/completions", content=b'{"prompt": [1, 2',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": "hi"})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_rl_endpoints(url, served_checkpoint):
    assert httpx.get(f"{url}/weight_version").json() == {"weight_version": 0}
    assert httpx.post(f"{url}/pause", json={"mode": "keep"}).json()["mode"] == "keep"
    assert httpx.get(f"{url}/stats").json()["paused"] == "keep"
    assert httpx.post(f"{url}/resume").json() == {"status": "running"}
    assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
    bad = httpx.post(f"{url}/pause", json={"mode": "later"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mode"
    stats = httpx.get(f"{url}/stats").json()
    assert stats["free_kv_blocks"] == stats["num_kv_blocks"] and stats["paused"] is None


def test_weight_broadcast_through_http_endpoints(url, served_checkpoint):
    """A trainer process's WeightSender -> /init_weight_sync + /update_weights."""
    from test_weight_broadcast import _spawn, free_port
    prompt = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "logprobs": 0}
    before = httpx.post(f"{url}/v1/completions", json=prompt).json()
    port = free_port()
    proc, done = _spawn(served_checkpoint, port, [3], False)
    try:
        init = httpx.post(f"{url}/init_weight_sync", timeout=60, json=dict(
            master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2,
            backend="gloo"))
        assert init.status_code == 200, init.text
        update = httpx.post(f"{url}/update_weights", json={"timeout_s": 60}, timeout=90)
        assert update.status_code == 200, update.text
        assert update.json() == {"weight_version": 13}
    finally:
        done.set()
        proc.join(30)
    assert httpx.get(f"{url}/weight_version").json() == {"weight_version": 13}
    after = httpx.post(f"{url}/v1/completions", json=prompt).json()
    assert (after["choices"][0]["logprobs"]["token_logprobs"]
            != before["choices"][0]["logprobs"]["token_logprobs"])


def test_update_weights_from_disk_endpoint(url, served_checkpoint):
    response = httpx.post(f"{url}/update_weights_from_disk", json={"path": served_checkpoint})
    assert response.status_code == 200, response.text
    version = response.json()["weight_version"]
    assert httpx.get(f"{url}/weight_version").json() == {"weight_version": version}
    out = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).json()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    missing = httpx.post(f"{url}/update_weights_from_disk", json={"path": "/nonexistent"})
    assert 400 <= missing.status_code < 600 and missing.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_sse_stream_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"prompt": [1, 3], "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["prompt_tokens"] == 2
