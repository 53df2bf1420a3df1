"""Server-sent events, as the API streams them.

An event is one or more ``data:`` lines and a blank line. A text that holds
line breaks is sent as one ``data:`` line per line, which SSE clients join
with ``\\n`` again (a ``\\r`` or ``\\r\\n`` arrives as ``\\n``).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from django.http import StreamingHttpResponse

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
DONE = b"data: [DONE]\n\n"


def text_event(text: str) -> bytes:
    lines = _LINE_BREAK.split(text)
    return ("".join(f"data: {line}\n" for line in lines) + "\n").encode("utf-8")


def json_event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def event_stream(events: AsyncIterator[bytes]) -> StreamingHttpResponse:
    """An async streaming response of SSE events, unbuffered by proxies."""
    response = StreamingHttpResponse(events, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    # nginx buffers responses unless told not to.
    response["X-Accel-Buffering"] = "no"
    return response
