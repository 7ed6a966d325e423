"""Drives a Tollgate gateway with the official `openai` Python SDK.

Usage: sdk_checks.py SCENARIO, with TOLLGATE_URL and TOLLGATE_KEY in the
environment. Exits non-zero (with the failed assertion) if the SDK sees
anything other than what an OpenAI endpoint would give it.
"""

import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["TOLLGATE_URL"] + "/v1"
KEY = os.environ["TOLLGATE_KEY"]
MSGS = [{"role": "user", "content": "Say hello"}]


def basic():
    client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0)

    reply = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
    assert reply.choices[0].message.content == "the quick brown fox jumps", reply
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5, reply.usage
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, max_tokens=1)
    assert raw.headers["x-tollgate-deployment"] == "mock-a"
    assert raw.headers["x-request-id"]

    text, usage = "", None
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MSGS, max_tokens=9, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert text == "the quick brown fox jumps over the lazy dog", text
    assert usage is not None and usage.completion_tokens == 9, usage

    # The SDK asks for base64 embeddings by default and decodes them itself.
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 1536
    norm = sum(x * x for x in emb.data[0].embedding)
    assert abs(norm - 1.0) < 1e-3, norm

    comp = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=3)
    assert comp.choices[0].text == "the quick brown", comp

    models = [m.id for m in client.models.list()]
    assert "gpt-4o" in models, models
    print("basic: ok")


def errors():
    bad = OpenAI(base_url=BASE, api_key="tg-" + "0" * 64, max_retries=2)
    try:
        bad.chat.completions.create(model="gpt-4o", messages=MSGS)
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "invalid_api_key", (e.status_code, e.code)

    client = OpenAI(base_url=BASE, api_key=KEY, max_retries=2)
    try:
        client.chat.completions.create(model="gpt-unknown", messages=MSGS)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", (e.status_code, e.code)

    try:
        client.chat.completions.create(model="gpt-4o", messages="not a list")
        raise AssertionError("a malformed request was served")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.code == "invalid_value", (e.status_code, e.code)
        assert e.type == "invalid_request_error"

    # A stream the upstream breaks off raises in the SDK instead of ending quietly.
    try:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=10, stream=True, extra_headers={"x-mock-fault": "cut:3"}
        )
        for _ in stream:
            pass
        raise AssertionError("a broken stream looked complete")
    except openai.APIError as e:
        assert "broke off" in str(e), e
    print("errors: ok")


def at_limit():
    """A key at its RPM limit: the SDK must wait what the gateway says, then succeed."""
    import json
    import time

    import httpx

    seen = []

    def record(response):
        seen.append(
            {
                "at": time.monotonic(),
                "status": response.status_code,
                "retry_after_ms": response.headers.get("retry-after-ms"),
                "should_retry": response.headers.get("x-should-retry"),
            }
        )

    http = httpx.Client(event_hooks={"response": [record]})
    client = OpenAI(base_url=BASE, api_key=KEY, max_retries=3, http_client=http)
    reply = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    assert reply.usage.completion_tokens == 2, reply
    assert [s["status"] for s in seen][-1] == 200, seen
    assert seen[0]["status"] == 429 and seen[0]["should_retry"] == "true", seen
    waited = (seen[1]["at"] - seen[0]["at"]) * 1000
    assert waited >= float(seen[0]["retry_after_ms"]), (waited, seen)
    print(json.dumps(seen))
    print("at_limit: ok")


def money():
    """A spent budget and an empty account: the SDK (default retries on) sends
    one request each and raises, instead of retrying what cannot succeed."""
    import httpx

    seen = []
    http = httpx.Client(event_hooks={"response": [lambda r: seen.append(r.status_code)]})

    capped = OpenAI(base_url=BASE, api_key=KEY, http_client=http)
    assert capped.max_retries == 2, capped.max_retries
    try:
        capped.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
        raise AssertionError("a spent budget served a request")
    except openai.RateLimitError as e:
        assert e.status_code == 429, e.status_code
        assert e.type == "budget_exceeded" and e.code == "budget_exceeded", (e.type, e.code)
        assert e.body["scope"] == "key:sdk-budget", e.body
    assert seen == [429], seen

    seen.clear()
    broke = OpenAI(base_url=BASE, api_key=os.environ["TOLLGATE_KEY_EMPTY_ACCOUNT"], http_client=http)
    try:
        broke.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=5)
        raise AssertionError("an empty account was served")
    except openai.APIStatusError as e:
        assert e.status_code == 402, e.status_code
        assert e.type == "insufficient_credits", e.type
        assert e.body["account"] == "empty", e.body
    assert seen == [402], seen
    print("money: ok")


def idempotent():
    """The first answer is lost (the SDK times out while the upstream is still
    working) and the SDK retries with the same Idempotency-Key: the retry gets
    the first execution's answer."""
    client = OpenAI(base_url=BASE, api_key=KEY, timeout=0.25, max_retries=4)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSGS, max_tokens=4, extra_headers={"Idempotency-Key": "sdk-order-7"}
    )
    assert raw.headers.get("x-tollgate-idempotent-replay") == "true", dict(raw.headers)
    assert raw.retries_taken >= 1, raw.retries_taken
    reply = raw.parse()
    assert reply.usage.completion_tokens == 4, reply.usage
    print("idempotent: ok")


if __name__ == "__main__":
    {"basic": basic, "errors": errors, "at_limit": at_limit, "money": money, "idempotent": idempotent}[sys.argv[1]]()
