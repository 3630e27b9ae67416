"""Drives `lambdachat serve` with OpenAI's own Python client (tests/openai_python.rs runs it).

    python openai_client.py basics URL   # a server started with --temperature 0
    python openai_client.py load URL     # the same, with --queue 0 and a large --max-tokens

Exits non-zero with the failed assertion on stderr.
"""

import sys
import time

import openai


def client(url):
    # No retries: a 429 must reach the test, not be retried away.
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def basics(url):
    c = client(url)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    first = c.chat.completions.create(model="anything", messages=messages, max_tokens=6)
    assert first.object == "chat.completion", first
    reply = first.choices[0].message.content
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    usage = first.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    ext = usage.model_extra["lambdachat"]
    assert ext["continued"] is False and ext["tokens_reused"] == 0, ext

    # The same request streamed: the same reply in chunks, the usage last.
    stream = c.chat.completions.create(
        model="anything",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reply, (text, reply)
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens, chunks[-1]

    # Continued: only the new message is fed.
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    second = c.chat.completions.create(model="anything", messages=messages, max_tokens=4)
    ext2 = second.usage.model_extra["lambdachat"]
    assert ext2["continued"] is True, ext2
    assert ext2["tokens_fed"] < ext["tokens_fed"], (ext2, ext)
    assert ext2["tokens_reused"] == usage.total_tokens, (ext2, usage)

    # Errors arrive as the client's exception types.
    try:
        c.chat.completions.create(model="anything", messages=[], max_tokens=1)
        raise AssertionError("an empty conversation was accepted")
    except openai.BadRequestError as e:
        assert "last message" in e.message, e.message
    models = c.models.list()
    assert len(models.data) == 1, models

    # Raw completion: a text continued with no template, whole and streamed alike.
    done = c.completions.create(model="anything", prompt="once upon a time", max_tokens=4)
    assert done.object == "text_completion", done
    assert done.usage.completion_tokens == 4, done.usage
    pieces = c.completions.create(
        model="anything", prompt="once upon a time", max_tokens=4, stream=True
    )
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    assert text == done.choices[0].text, (text, done.choices[0].text)


def load(url):
    c = client(url)
    long = c.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "go on forever"}],
        max_tokens=1_000_000,
        stream=True,
    )
    chunks = iter(long)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant", first
    try:
        c.chat.completions.create(model="anything", messages=[{"role": "user", "content": "me too"}], max_tokens=1)
        raise AssertionError("a second request was taken while the queue was full")
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after") == "1", e.response.headers
    # The client leaves: the model is free again within moments.
    long.close()
    deadline = time.time() + 10
    while True:
        try:
            c.chat.completions.create(model="anything", messages=[{"role": "user", "content": "me too"}], max_tokens=1)
            break
        except openai.RateLimitError:
            assert time.time() < deadline, "still busy 10 s after the client left"
            time.sleep(0.05)


if __name__ == "__main__":
    {"basics": basics, "load": load}[sys.argv[1]](sys.argv[2])
    print("ok")
