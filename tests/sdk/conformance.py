"""The official OpenAI and Anthropic Python SDKs against a running gateway.

Run by tests/it/sdk.rs, which starts the gateway in front of the mock
router and passes its address and credentials in the environment:
PORTCULLIS_URL, OMNI_KEY (every route), ACME_KEY (a plan without
Responses or Messages) and THROTTLED_KEY (a burst of 2). Every check
raises on failure; the last line printed is "ok <number of checks>".
"""

import os

import anthropic
import openai

URL = os.environ["PORTCULLIS_URL"]
MODEL = "m-small"
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def raises(exc, fn, what):
    try:
        fn()
    except exc as e:
        check(True, what)
        return e
    raise AssertionError(f"{what}: no {exc.__name__}")


oa = openai.OpenAI(base_url=f"{URL}/v1", api_key=os.environ["OMNI_KEY"], max_retries=0)

# Responses: create, stream, retrieve by the bound id, delete.
r = oa.responses.create(model=MODEL, input="Hello", instructions="Be brief.")
check(r.id.startswith("resp_") and "mock" not in r.id, f"a bound id: {r.id}")
check(r.output_text == "Hello from the mock router.", f"output_text: {r.output_text!r}")
check(r.usage is not None and r.usage.output_tokens == 6, "usage parsed")
got = oa.responses.retrieve(r.id)
check(got.id == r.id, "retrieve by the bound id")
follow = oa.responses.create(model=MODEL, input="and then?", previous_response_id=r.id)
check(follow.previous_response_id == r.id, "previous_response_id comes back bound")

stream_ids, kinds, text = set(), [], ""
with oa.responses.stream(model=MODEL, input="Hello") as stream:
    for event in stream:
        kinds.append(event.type)
        if hasattr(event, "response"):
            stream_ids.add(event.response.id)
        if event.type == "response.output_text.delta":
            text += event.delta
    final = stream.get_final_response()
check(kinds[0] == "response.created" and kinds[-1] == "response.completed", f"events: {kinds}")
check(len(stream_ids) == 1 and final.id in stream_ids, f"one bound id per stream: {stream_ids}")
check(text == "Hello from the mock router.", f"streamed text: {text!r}")
check(oa.responses.retrieve(final.id).id == final.id, "a streamed id retrieves")
oa.responses.delete(r.id)
check(True, "delete")

# Another tenant with Responses (its burst is two: this is one of them).
th_oa = openai.OpenAI(base_url=f"{URL}/v1", api_key=os.environ["THROTTLED_KEY"], max_retries=0)
e = raises(openai.NotFoundError, lambda: th_oa.responses.retrieve(final.id), "another tenant's id")
check(e.code == "response_not_found", f"code: {e.code}")
other = openai.OpenAI(base_url=f"{URL}/v1", api_key=os.environ["ACME_KEY"], max_retries=0)
e = raises(openai.PermissionDeniedError,
           lambda: other.responses.create(model=MODEL, input="x"), "a plan without responses")
check(e.code == "route_not_allowed", f"code: {e.code}")

# Models, chat, embeddings.
check(oa.models.retrieve(MODEL).id == MODEL, "models.retrieve")
raises(openai.NotFoundError, lambda: oa.models.retrieve("m-large"), "an unlisted model")
chat = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
check(chat.choices[0].message.content == "Hello from the mock router.", "chat")
chunks = list(oa.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True))
check(all(c.usage is None for c in chunks), "no usage chunk the client did not ask for")
emb = oa.embeddings.create(model=MODEL, input="Hi")
check(len(emb.data[0].embedding) == 3, "embeddings")
# The SDK's own multipart encoding passes the strict framing check.
tr = oa.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF\r\n--x\r\nWAVE", "audio/wav"))
check(tr.text == "Hello from the mock router.", "audio.transcriptions")
raises(openai.PermissionDeniedError, lambda: oa.audio.transcriptions.create(
    model="m-large", file=("a.wav", b"RIFF", "audio/wav")), "an audio model not allowed")

# Anthropic: create, stream, count_tokens, typed errors.
an = anthropic.Anthropic(base_url=URL, api_key=os.environ["OMNI_KEY"], max_retries=0)
msg = an.messages.create(model=MODEL, max_tokens=64,
                         messages=[{"role": "user", "content": "Hello"}])
check(msg.content[0].text == "Hello from the mock router.", "messages.create")
check(msg.usage.output_tokens == 6, "usage parsed")
with an.messages.stream(model=MODEL, max_tokens=64,
                        messages=[{"role": "user", "content": "Hello"}]) as s:
    streamed = "".join(s.text_stream)
    final_msg = s.get_final_message()
check(streamed == "Hello from the mock router.", f"streamed: {streamed!r}")
check(final_msg.usage.output_tokens == 6, "stream usage")
count = an.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hello"}])
check(count.input_tokens > 0, "count_tokens")

acme = anthropic.Anthropic(base_url=URL, api_key=os.environ["ACME_KEY"], max_retries=0)
e = raises(anthropic.PermissionDeniedError, lambda: acme.messages.create(
    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]), "403 permission_error")
check(e.body["error"]["code"] == "route_not_allowed", f"the Portcullis code: {e.body}")
bad = anthropic.Anthropic(base_url=URL, api_key="pcl_not_a_key", max_retries=0)
raises(anthropic.AuthenticationError, lambda: bad.messages.create(
    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]), "401")

# 429: the rest of the burst of two, then each SDK's RateLimitError.
th_an = anthropic.Anthropic(base_url=URL, api_key=os.environ["THROTTLED_KEY"], max_retries=0)
th_an.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x"}])
e = raises(anthropic.RateLimitError, lambda: th_an.messages.create(
    model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]), "anthropic 429")
check(e.body["error"]["code"] == "rate_limit_exceeded", f"code: {e.body}")
check(e.response.headers.get("anthropic-ratelimit-requests-remaining") == "0", "anthropic headers")
e = raises(openai.RateLimitError, lambda: th_oa.responses.create(model=MODEL, input="x"), "openai 429")
check(e.code == "rate_limit_exceeded", f"code: {e.code}")

print(f"ok {checks}")
