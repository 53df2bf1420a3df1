"""Token logprobs in OpenAI's shapes: pure functions of the engine's
:class:`~inference.types.TokenLogprob` lists (a reply's, or one streamed
piece's: :attr:`chat.replies.ReplyText.logprobs`).

* Chat completions (:func:`chat_logprobs`): ``choices[].logprobs`` is
  ``{"content": [...], "refusal": None}``, one entry a token; in a stream,
  each chunk's choice carries the entries of its own piece.
* Text completions (:func:`text_logprobs`): the legacy shape, four parallel
  lists. ``text_offset`` counts characters from ``text_offset_start`` (0, or
  the prompt's length when the prompt is echoed); a stream carries the offset
  from chunk to chunk with :func:`text_offset_after`, not with the length of
  the chunk's text: a token comes with the piece that ends its text, which
  may have begun in an earlier piece (a character split between tokens, text
  held back while it may begin a stop string).

How tokens map to text pieces, and what the numbers are, is
:class:`inference.types.TextDelta`'s and :class:`inference.types.TokenLogprob`'s
to say.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from inference.types import TokenLogprob, TopLogprob


def _entry(item: TokenLogprob | TopLogprob) -> dict[str, Any]:
    return {"token": item.token, "logprob": item.logprob, "bytes": list(item.bytes)}


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat completion choice's ``logprobs`` (or a chunk's, for the tokens
    of its piece): ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...], "refusal": None}``."""
    return {
        "content": [{**_entry(item), "top_logprobs": [_entry(top) for top in item.top]} for item in items],
        "refusal": None,
    }


def text_logprobs(items: Sequence[TokenLogprob], text_offset_start: int) -> dict[str, Any]:
    """A text completion choice's legacy ``logprobs``: ``{"tokens": [...],
    "token_logprobs": [...], "top_logprobs": [{token: logprob, ...}, ...],
    "text_offset": [...]}``.

    Each ``top_logprobs`` mapping holds the alternatives, most likely first,
    and the sampled token (OpenAI: "up to logprobs+1 elements"); alternatives
    of the same text keep the likelier one's logprob. Each ``text_offset`` is
    where the token's text begins: ``text_offset_start`` plus the characters
    before it (a token that begins inside a character, its bytes split between
    two tokens, begins with that character).
    """
    tops: list[dict[str, float]] = []
    for item in items:
        top: dict[str, float] = {}
        for alternative in item.top:
            top.setdefault(alternative.token, alternative.logprob)
        top.setdefault(item.token, item.logprob)
        tops.append(top)
    offsets: list[int] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = 0
    for item in items:
        offsets.append(text_offset_start + chars)
        chars += len(decoder.decode(bytes(item.bytes)))
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def text_offset_after(items: Sequence[TokenLogprob], text_offset_start: int) -> int:
    """The text offset just after ``items`` (the next chunk's
    ``text_offset_start``): ``text_offset_start`` plus the characters their
    bytes make (each piece's tokens end on a whole character)."""
    return text_offset_start + len(b"".join(bytes(item.bytes) for item in items).decode("utf-8", "replace"))


__all__ = ["chat_logprobs", "text_logprobs", "text_offset_after"]
