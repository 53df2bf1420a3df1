"""A model served by a remote OpenAI-compatible server, through the
EngineClient contract: a second instance of this service (its /v1 API, started
here with the real model), and a tiny server of the test's own that speaks
OpenAI's server-sent events and then misbehaves."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from inference import registry
from inference.remote import RemoteClient, RemoteUnavailable
from inference.specs import ModelConfigError, ModelSpec
from inference.types import EngineBusy, Finished, TextDelta
from tests.api_helpers import prepared_env
from tests.conftest import greedy
from tests.processes import daphne, free_port


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second instance of this service with an open API; yields its /v1 base."""
    env = prepared_env(tmp_path_factory.mktemp("upstream"), CHATSITE_API_REQUIRE_KEY="false")
    with daphne(env) as url:
        yield url + "/v1"


class Misbehaving(BaseHTTPRequestHandler):
    """``/<mode>/v1/chat/completions``: two chunks of text, then per mode:
    ``stop`` closes the connection, ``hang`` goes silent, ``busy`` and
    ``broken`` answer 503 and 500 at once, ``silent`` sends no headers;
    ``logprobs`` gives each chunk the logprobs the request asked for (the
    first in a chunk of its own, without text, as llama-server may) and ends
    the stream properly."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        mode = self.path.split("/")[1]
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if mode in ("busy", "broken"):
            body = json.dumps({"error": {"message": f"{mode} upstream"}}).encode()
            self.send_response(503 if mode == "busy" else 500)
            if mode == "busy":
                self.send_header("Retry-After", "7")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if mode == "silent":
            time.sleep(3)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if mode == "logprobs":
            self.send_logprobs(request)
            return
        for text in ("Hello", " there"):
            chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if mode == "hang":
            time.sleep(3)
        self.close_connection = True

    def send_logprobs(self, request: dict[str, object]) -> None:
        assert request["logprobs"] is True
        top = int(request["top_logprobs"])  # type: ignore[call-overload]

        def entry(token: str, logprob: float) -> dict[str, object]:
            alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}] * top
            return {**alternatives[0], "top_logprobs": alternatives}

        chunks: list[dict[str, Any]] = [
            {"delta": {"content": ""}, "logprobs": {"content": [entry("Hel", -0.5)]}},
            {"delta": {"content": "Hello"}, "logprobs": {"content": [entry("lo", -0.25)]}},
            {"delta": {"content": " there"}, "logprobs": {"content": [entry(" there", -1.0)]}},
            {"delta": {}, "finish_reason": "stop"},
        ]
        for choice in chunks:
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, **choice}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def remote(url: str, **table: object) -> RemoteClient:
    spec = ModelSpec.from_table("upstream", {"url": url, "remote_model": "smollm2-135m", **table})
    return RemoteClient(spec)


async def run(client: RemoteClient, *, max_tokens: int = 16, stop_after: int | None = None):
    text: list[str] = []
    async with client.stream(greedy("Name three colours.", max_tokens=max_tokens)) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
                if stop_after is not None and len(text) >= stop_after:
                    stream.cancel()
            else:
                assert isinstance(event, Finished)
                return "".join(text), event
    raise AssertionError("no Finished event")


async def test_it_streams_a_reply_from_another_instance(upstream: str) -> None:
    text, finished = await run(remote(upstream))
    assert text
    assert finished.reason in ("stop", "length")
    assert finished.prompt_tokens > 0
    assert finished.completion_tokens > 0


async def test_it_is_the_registrys_client_for_a_model_with_a_url(upstream: str, settings) -> None:
    settings.CHATSITE_MODELS = {"upstream": {"url": upstream, "remote_model": "smollm2-135m"}}
    client = registry.get_engine("upstream")
    assert isinstance(client, RemoteClient)
    text, finished = await run(client)
    assert text
    assert finished.reason in ("stop", "length")


async def test_it_cancels_the_upstream_request(upstream: str) -> None:
    text, finished = await run(remote(upstream), max_tokens=400, stop_after=2)
    assert finished.reason == "cancelled"
    assert text
    assert finished.completion_tokens < 400


async def test_it_reports_an_upstream_that_stops_mid_stream(misbehaving: str) -> None:
    text, finished = await run(remote(f"{misbehaving}/stop/v1"))
    assert text == "Hello there"
    assert finished.reason == "error"
    assert "closed the stream before its end" in (finished.error or "")


async def test_it_reports_an_upstream_that_goes_silent(misbehaving: str) -> None:
    text, finished = await run(remote(f"{misbehaving}/hang/v1", read_timeout=0.5))
    assert text == "Hello there"
    assert finished.reason == "error"
    assert "sent nothing for 0.5 s" in (finished.error or "")


async def test_it_refuses_before_the_first_token_with_the_upstreams_reason(misbehaving: str) -> None:
    with pytest.raises(EngineBusy, match="busy upstream"):
        await run(remote(f"{misbehaving}/busy/v1"))
    with pytest.raises(RemoteUnavailable, match="answered 500: broken upstream"):
        await run(remote(f"{misbehaving}/broken/v1"))
    with pytest.raises(RemoteUnavailable, match=r"sent nothing for 0\.5 s"):
        await run(remote(f"{misbehaving}/silent/v1", read_timeout=0.5))


async def test_it_keeps_the_servers_address_out_of_the_errors_people_see(misbehaving: str, caplog) -> None:
    # The URL may carry credentials: errors reach the people using the model
    # (the reply's error on the page, the API's error body), the log only
    # the address without them.
    host = misbehaving.removeprefix("http://")
    with pytest.raises(EngineBusy) as busy:
        await run(remote(f"http://ops:hunter2@{host}/busy/v1"))
    assert "hunter2" not in str(busy.value)
    assert host not in str(busy.value)
    assert "the remote server of model 'upstream'" in str(busy.value)
    # Its own Retry-After is passed on.
    assert busy.value.retry_after == 7
    assert "hunter2" not in caplog.text
    assert f"http://{host}/busy/v1" in caplog.text
    with pytest.raises(RemoteUnavailable) as refused:
        await run(remote(f"http://ops:hunter2@127.0.0.1:{free_port()}/v1"))
    assert "hunter2" not in str(refused.value)


async def test_it_asks_for_logprobs_and_passes_the_servers_on(misbehaving: str) -> None:
    client = remote(f"{misbehaving}/logprobs/v1")
    deltas = []
    async with client.stream(greedy("Name three colours.", logprobs=2)) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                deltas.append(event)
            else:
                assert event.reason == "stop"
    assert [delta.text for delta in deltas] == ["Hello", " there"]
    # The logprobs of a chunk without text come with the next text.
    assert [[item.token for item in delta.logprobs] for delta in deltas] == [["Hel", "lo"], [" there"]]
    first = deltas[0].logprobs[0]
    assert (first.logprob, first.bytes, len(first.top)) == (-0.5, tuple(b"Hel"), 2)
    # No alternatives: one is asked for (llama-server gives no logprobs for 0) and left out.
    async with client.stream(greedy("Name three colours.", logprobs=0)) as stream:
        events = [event async for event in stream]
    items = [item for event in events if isinstance(event, TextDelta) for item in event.logprobs]
    assert [len(item.top) for item in items] == [0, 0, 0]


async def test_it_reports_a_refused_connection() -> None:
    with pytest.raises(RemoteUnavailable, match="refused the connection"):
        await run(remote(f"http://127.0.0.1:{free_port()}/v1"))


async def test_it_refuses_past_its_own_concurrency_limit(misbehaving: str) -> None:
    client = remote(f"{misbehaving}/hang/v1", max_concurrency=1)
    first = client.stream(greedy("Hi."))
    with pytest.raises(EngineBusy):
        client.stream(greedy("Hi."))
    first.cancel()
    async for event in first:
        if isinstance(event, Finished):
            assert event.reason == "cancelled"


def test_it_names_the_table_and_key_of_a_bad_remote_setting() -> None:
    with pytest.raises(ModelConfigError, match=r"\[models.up\] url must be an http"):
        ModelSpec.from_table("up", {"url": "ftp://x"})
    with pytest.raises(ModelConfigError, match=r"\[models.up\] read_timeout must be a number"):
        ModelSpec.from_table("up", {"url": "http://x/v1", "read_timeout": 0})
    with pytest.raises(ModelConfigError, match=r"\[models.up\] api_key go\(es\) with url"):
        ModelSpec.from_table("up", {"path": "/x.gguf", "api_key": "k"})
