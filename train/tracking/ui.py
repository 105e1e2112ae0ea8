"""MLflow's server with its UI opening in the "Model training" view: `mlflow server --app-name
spikescale` (what `make mlflow-ui` and the tests' server run).

MLflow 3's UI takes its view from the URL's `workflowType`, else from the browser's last choice
(localStorage `mlflow.workflowType_v1`), else GenAI; the experiment's `mlflow.experimentKind` tag
does not decide it. So a run page opened from a bookmark, a notebook or a colleague's message
would show "Evaluations" and "Judges" for a training run. This app is MLflow's own (the FastAPI
app `mlflow server` runs), plus one line of script in the HTML page that makes model training
the browser's choice when it has made none: a user who switches to GenAI keeps that choice.
"""
from __future__ import annotations

STORAGE_KEY = "mlflow.workflowType_v1"  # mlflow/server/js: `${key}_v${version}`, a JSON value
DEFAULT_VIEW = (f'<script>try{{if(!localStorage.getItem("{STORAGE_KEY}"))'
                f'localStorage.setItem("{STORAGE_KEY}",\'"machine_learning"\')}}catch(e){{}}</script>').encode()


class ModelTrainingView:
    """ASGI middleware: puts DEFAULT_VIEW first in the <head> of every HTML response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        body: list[bytes] = []

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    return await send(message)
                start = message  # held until the whole page is here
                return
            if start is None:
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body).replace(b"<head>", b"<head>" + DEFAULT_VIEW, 1)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, rewrite)


def create_app():
    """The app `mlflow server --app-name spikescale` serves (a factory: `mlflow server` imports
    this module before it has set up the store, and MLflow's app reads that set-up)."""
    from mlflow.server.fastapi_app import app

    return ModelTrainingView(app)
