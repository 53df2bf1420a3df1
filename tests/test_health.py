"""/health (liveness) and /ready (readiness)."""

from __future__ import annotations

import pytest
from django.test import AsyncClient, Client
from django.test.utils import override_settings

from inference import registry
from inference.engine import Engine, gpu_offload_supported
from inference.types import Finished, TextDelta
from tests.conftest import greedy


def test_it_reports_models_offload_and_version(client: Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    default = next(model for model in body["models"] if model["default"])
    assert default["name"] == registry.get_spec().name
    assert isinstance(default["loaded"], bool)
    assert body["gpu_offload_supported"] is gpu_offload_supported()
    assert body["llama_cpp_python"].startswith("0.3.")


async def test_it_answers_health_while_a_generation_runs(engine: Engine, async_client: AsyncClient) -> None:
    generation = engine.stream(greedy("Write a long story about a dragon.", max_tokens=300))
    first = await generation.__anext__()
    assert isinstance(first, TextDelta)
    response = await async_client.get("/health")
    # The answer came back while the engine was still generating.
    assert engine.running
    generation.cancel()
    events = [event async for event in generation]
    assert isinstance(events[-1], Finished)
    assert events[-1].reason == "cancelled"
    assert response.status_code == 200
    default = next(model for model in response.json()["models"] if model["default"])
    assert default["loaded"] is True
    assert default["running"] is True


@pytest.mark.django_db
def test_it_is_ready_when_the_database_answers_and_the_model_is_there(client: Client) -> None:
    response = client.get("/ready")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready"}
    assert client.get("/readiness").status_code == 200


@pytest.mark.django_db
def test_it_is_not_ready_when_the_model_file_is_missing(client: Client, tmp_path: object) -> None:
    models = {"missing": {"path": "/nonexistent/model.gguf"}}
    with override_settings(CHATSITE_MODELS=models, CHATSITE_DEFAULT_MODEL="missing"):
        response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert any("/nonexistent/model.gguf" in reason for reason in body["reasons"])


def test_it_serves_metrics_without_a_token_by_default(client: Client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert b"chatsite_requests_total" in response.content or b"chatsite_requests" in response.content
    assert b"django_http_requests" in response.content


def test_it_protects_metrics_with_a_bearer_token_when_configured(client: Client) -> None:
    with override_settings(CHATSITE_METRICS_TOKEN="s3cret"):
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_it_is_not_ready_while_the_default_models_queue_is_full(
    engine: Engine, async_client: AsyncClient
) -> None:
    assert engine is registry.get_engine()
    # Every slot busy with a long reply, then every place in the queue taken.
    running = [
        engine.stream(greedy(f"Write a long story about dragon number {n}.", max_tokens=300))
        for n in range(engine.parallel)
    ]
    for generation in running:
        assert isinstance(await generation.__anext__(), TextDelta)
    waiting = [engine.stream(greedy(f"Question {n}?", max_tokens=4)) for n in range(engine.queue_size)]
    try:
        response = await async_client.get("/ready")
    finally:
        for generation in [*waiting, *running]:
            generation.cancel()
    assert response.status_code == 503
    assert response.json()["reasons"] == ["the default model's queue is full"]
    for generation in [*waiting, *running]:
        async for _ in generation:
            pass
    assert (await async_client.get("/ready")).status_code == 200
