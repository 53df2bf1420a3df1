"""POST /v1/embeddings: OpenAI's embeddings, from models marked
``embeddings = true``.

The view checks the request (the model serves embeddings; no ``dimensions``),
has the model's :class:`~inference.embeddings.Embedder` tokenize the inputs
(each must be non-empty, within the vocabulary and the context window),
holds their tokens against the caller's token budgets, has them embedded,
settles the budgets and answers OpenAI's list of embeddings, each a unit
vector as floats or as base64 (little-endian float32, as OpenAI's). Token
arrays are the model's own token ids (a model here has no tiktoken ids).

A remote model (``url``) is refused, not passed through: the service would
have to relay another server's vectors and counts as its own, and in workers
mode (``inference.mode = "workers"``) a front end loads no model, so there
too the embeddings are refused (docs/api.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Literal

from django.http import HttpRequest, HttpResponse
from ninja import Router, Schema
from pydantic import ConfigDict, Discriminator, Field, Strict, Tag

from api import openai
from api.auth import Caller
from api.errors import ApiError
from api.replies import check_model
from api.schemas import Text
from chatsite import ratelimit
from inference import registry
from inference.embeddings import Embedder, InvalidInput, Vectors
from inference.types import InferenceError

router = Router()

ERRORS = frozenset({400, 401, 404, 413, 429, 500, 503})

# OpenAI's own limit of inputs per request.
MAX_INPUTS = 2048
# Tokens per request, all inputs together: 8 full windows of the bundled
# model. It embeds about 150 tokens/s per thread on a 2-core CPU without
# AMX buffers (python -m bench.embeddings), so a request at this bound takes
# about two minutes there, and fits the default key budget (20,000 tokens a
# minute).
MAX_REQUEST_TOKENS = 16_384

TokenId = Annotated[int, Strict(), Field(ge=0)]
TokenArray = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_REQUEST_TOKENS)]


def _input_shape(value: object) -> str | None:
    """Which of the four shapes an ``input`` is, by its first item, so that
    an error is about that shape's item (``input.3``: not a string) instead
    of four shapes' complaints. The tags are named like pydantic's union
    members, which the error mapping leaves out of ``param``."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "list[list[int]]"
    if isinstance(first, int | float):  # a bool or a float is then refused as a token id
        return "list[int]"
    return "list[str]"


EmbeddingInput = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS), Tag("list[str]")]
    | Annotated[TokenArray, Tag("list[int]")]
    | Annotated[
        list[TokenArray],
        Field(min_length=1, max_length=MAX_INPUTS),
        Tag("list[list[int]]"),
    ],
    Discriminator(
        _input_shape,
        custom_error_type="invalid_input",
        custom_error_message=(
            "Input should be a string, a list of strings, a token array or a list of token arrays"
        ),
    ),
    Field(
        description=(
            "A text, a list of texts, a token array (the model's token ids) or a list of token "
            f"arrays: at most {MAX_INPUTS} inputs and {MAX_REQUEST_TOKENS} tokens in all, each "
            "input non-empty and within the model's context window."
        )
    ),
]


class EmbeddingRequest(Schema):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        default=None, description="Not supported: the embeddings have the model's own dimensions."
    )
    # Metadata: accepted, not used.
    user: str | None = Field(default=None, max_length=256)


class Embedding(Schema):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The unit vector, or its float32 bytes in base64.")


class EmbeddingUsage(Schema):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Schema):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _embedder(model: str) -> Embedder:
    """The model's embedder; a 400 naming ``model`` when it serves none here."""
    spec = registry.get_spec(model)
    if not spec.embeddings:
        raise ApiError(
            400,
            f"The model '{model}' does not serve embeddings (its table does not say embeddings = true).",
            param="model",
            code="model_not_supported",
        )
    if spec.remote is not None or registry.workers_mode():
        raise ApiError(
            400,
            f"The model '{model}' is not run by this server: embeddings are only served by local models.",
            param="model",
            code="model_not_supported",
        )
    return registry.get_embedder(model)


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> tuple[list[str | list[int]], bool]:
    """The inputs as a list, and whether the request sent a single one."""
    if isinstance(value, str):
        return [value], True
    if value and all(isinstance(item, int) for item in value):
        return [value], True  # type: ignore[list-item]  # one token array
    return list(value), False  # type: ignore[arg-type]


def _input_error(exc: InvalidInput, *, single: bool) -> ApiError:
    param = "input" if single else f"input.{exc.index}"
    code = "context_length_exceeded" if exc.problem == "too_long" else "invalid_value"
    return ApiError(400, f"Invalid value for '{param}': it {exc.detail}.", param=param, code=code)


def _response(vectors: Vectors, *, model: str, tokens: int, encoding: str) -> HttpResponse:
    """OpenAI's list of embeddings as a JSON response. Blocking (a request's
    vectors are up to millions of numbers): run it off the event loop."""
    if encoding == "base64":
        little = vectors.astype("<f4", copy=False)
        values: list[list[float]] | list[str] = [
            base64.b64encode(row.tobytes()).decode("ascii") for row in little
        ]
    else:
        values = vectors.tolist()
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": value} for index, value in enumerate(values)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return HttpResponse(json.dumps(body, separators=(",", ":")), content_type="application/json")


@router.post(
    "/embeddings",
    response={200: EmbeddingList, ERRORS: openai.ErrorBody},
    summary="Create embeddings",
)
async def create_embeddings(request: HttpRequest, body: EmbeddingRequest) -> HttpResponse:
    caller = request.auth  # type: ignore[attr-defined]
    assert isinstance(caller, Caller)
    model = check_model(body.model)
    if body.dimensions is not None:
        raise ApiError(
            400,
            "'dimensions' is not supported: the embeddings have the model's own dimensions.",
            param="dimensions",
            code="unsupported_parameter",
        )
    embedder = _embedder(model)
    inputs, single = _inputs(body.input)
    try:
        tokens = await embedder.tokenize(inputs)
    except InvalidInput as exc:
        raise _input_error(exc, single=single) from None
    total = sum(len(item) for item in tokens)
    if total > MAX_REQUEST_TOKENS:
        raise ApiError(
            400,
            f"The inputs are {total} tokens in all, more than the {MAX_REQUEST_TOKENS} one request may have.",
            param="input",
            code="too_many_tokens",
        )

    reservation = None
    if any(limit.tokens_per_minute for limit in caller.limits):
        reservation = await ratelimit.areserve_tokens(caller.limits, total)
    # Embedding input tokens are prompt tokens; a request cut short (the
    # client went away) may have evaluated them all, so it keeps them.
    spent = total
    try:
        vectors = await embedder.embed(tokens)
    except InferenceError:
        spent = 0  # refused (the queue is full, the model is shutting down): nothing evaluated
        raise
    finally:
        await ratelimit.asettle(reservation, spent)
    return await asyncio.to_thread(
        _response, vectors, model=model, tokens=total, encoding=body.encoding_format
    )


__all__ = ["MAX_INPUTS", "MAX_REQUEST_TOKENS", "EmbeddingList", "EmbeddingRequest", "router"]
