"""The server app behind `make mlflow-ui`: MLflow's own, with model training as the UI's default
view (train/tracking/ui.py), checked on the ASGI calls without a server."""
import asyncio

from train.tracking.ui import DEFAULT_VIEW, STORAGE_KEY, ModelTrainingView


def call(app, path: str = "/") -> tuple[dict, bytes]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send))
    start = sent[0]
    return dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def responder(content_type: bytes, chunks: list[bytes]):
    async def app(scope, receive, send):
        body = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    return app


def test_the_page_sets_model_training_as_the_default_view_before_the_app_loads():
    page = [b"<!doctype html><html><head><title>MLflow</title>", b"<script src=main.js></script></head></html>"]
    headers, body = call(ModelTrainingView(responder(b"text/html; charset=utf-8", page)))
    assert body.startswith(b"<!doctype html><html><head>" + DEFAULT_VIEW + b"<title>")
    assert int(headers[b"content-length"]) == len(body)
    # only where the browser has not chosen: a user's switch to GenAI stays theirs
    assert f'if(!localStorage.getItem("{STORAGE_KEY}"))'.encode() in DEFAULT_VIEW
    assert b'"machine_learning"' in DEFAULT_VIEW


def test_api_responses_pass_through_untouched():
    payload = b'{"runs": [], "note": "<head>"}'
    headers, body = call(ModelTrainingView(responder(b"application/json", [payload])), "/api/2.0/mlflow/runs/search")
    assert body == payload and headers[b"content-length"] == str(len(payload)).encode()
