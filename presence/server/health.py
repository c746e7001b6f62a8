"""For operators: ``/healthz`` (the process answers), ``/readyz`` (it reaches the other
replicas), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from presence.hub.hub import Hub


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    ready = hub.started and hub.backplane.ready
    body: dict[str, Any] = {"ready": ready, "backplane": type(hub.backplane).__name__}
    if (status := hub.backplane.status()) is not None:
        body["redis"] = status
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    return PlainTextResponse(
        hub.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
