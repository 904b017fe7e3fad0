"""HTTP inference over onnxruntime: the three protocols' routers (serving/protocols/: the service's own
/predict, the Open Inference Protocol under /v2, MLflow's scoring protocol on /invocations), assembled here with
the shared limits and error handling, and run by uvicorn with two more limits of its own.

Bad input always gets a 4xx with a JSON {"error": ...} that says what was wrong, and the service keeps
serving: 400 undecodable JSON or image, 408 a request that arrives too slowly, 413 too large (body bytes,
instance count, image pixels), 415 unsupported content type, 422 JSON that is not 28x28 integers in 0..255.
Only the server's own limits answer 5xx: inference slower than the time limit (503), and more open
connections than the cap (503).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from .auth import BearerAuth
from .http import ClientGone, InferenceTimeout, Served
from .inference import Predictor
from .metrics import Metrics
from .protocols import ProtocolError as BadRequest
from .protocols import mlflow_scoring, native, v2

log = logging.getLogger(__name__)

# The page at / (one static file, package data): inline script and style, and requests to this service only.
PAGE = Path(__file__).with_name("page.html")
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def create_app(predictor: Predictor, limits: ServeConfig, top_k: int, token: str | None = None) -> FastAPI:
    """The app: each protocol's router over one Served model, and the error handlers they share; with a
    ``token``, every route but the health routes needs it (auth.py)."""
    app = FastAPI(
        title="softmax-mlops inference",
        version="1",
        description="Fashion-MNIST softmax regression, served by onnxruntime: its own /predict, the Open "
        "Inference Protocol (KServe v2) under /v2, and MLflow's scoring protocol "
        "(/invocations, /ping, /version).",
    )
    name = predictor.metadata.get("registered_model") or "softmax-mlops"
    metrics = _metrics(predictor, limits, name)
    served = Served(predictor, limits, top_k, name, metrics if limits.metrics else None)
    for protocol_module in (native, v2, mlflow_scoring):
        app.include_router(protocol_module.router(served))

    page = PAGE.read_bytes()

    @app.get("/", include_in_schema=False)
    async def _page() -> Response:  # behind the token like every route but health (auth.py)
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    if limits.metrics:

        @app.get("/metrics", include_in_schema=False)
        def _metrics_page() -> Response:  # in a worker thread: the drift test (scipy) never stalls the event loop
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        if exc.limit:
            metrics.refused.labels(exc.limit).inc()
        if request.url.path in mlflow_scoring.PATHS:
            response = mlflow_scoring.refusal(exc)
        else:
            response = JSONResponse({"error": exc.message}, status_code=exc.status)
        if exc.status == 408:
            # The rest of the body may still be on its way, so the connection cannot carry another request
            # (RFC 9110, 15.5.9). Without this, uvicorn holds it open until serve.keep_alive_s runs out.
            response.headers["connection"] = "close"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep the exception's headers: a 405 must say which methods are allowed (Allow)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, _: ClientGone) -> JSONResponse:
        log.info("client %s disconnected before sending its whole request", request.client)
        return JSONResponse({"error": "client disconnected"}, status_code=400)

    @app.exception_handler(InferenceTimeout)
    async def _timeout(_: Request, exc: InferenceTimeout) -> JSONResponse:
        metrics.refused.labels("inference_time").inc()
        return JSONResponse({"error": str(exc)}, status_code=503)

    if token:
        app.add_middleware(BearerAuth, token=token)
    if limits.metrics:
        app.add_middleware(metrics.middleware)  # the outermost: refusals of the token are counted too
    app.state.metrics = metrics
    return app


def _metrics(predictor: Predictor, limits: ServeConfig, name: str) -> Metrics:
    """The app's metrics, with the drift window's reference when the model carries one."""
    from . import drift
    from .inference import sidecar

    reference_path = sidecar(predictor.path, drift.REFERENCE_FILE)
    reference = drift.load_reference(reference_path) if reference_path else None
    card = predictor.provenance()
    model = {
        "name": name,
        "version": card["model_version"],
        "data_md5": card["data_md5"],
        "temperature": str(predictor.metadata.get("temperature", "")),
    }
    return Metrics(list(predictor.class_names), model, limits.drift_window, reference)


def protocol(limits: ServeConfig, metrics: Metrics | None = None) -> type:
    """uvicorn's httptools protocol with two more limits of its own.

    uvicorn bounds the idle time between requests (timeout_keep_alive) but not a request whose headers
    trickle in, so a slow client could hold a connection for ever; and it accepts any number of connections.
    Here a request's headers must arrive within ``read_timeout_s`` of its first byte (or of the connection),
    else 408 and close; and a connection past ``max_connections`` gets 503 and is closed at once.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    def reply(transport: asyncio.Transport, status: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        transport.write(
            f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        transport.close()

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                if metrics is not None:
                    metrics.refused.labels("connections").inc()
                reply(
                    transport,
                    "503 Service Unavailable",
                    f"more than {limits.max_connections} open connections: try again later",
                )
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # a pipelined request began while the one before it is still being answered: let that answer
                # finish, and hold the new request's headers to the deadline afterwards
                self._arm()
                return
            if metrics is not None:
                metrics.refused.labels("read_timeout").inc()
            reply(
                self.transport, "408 Request Timeout", f"request headers not received within {limits.read_timeout_s} s"
            )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return LimitedHttpToolsProtocol


def uvicorn_settings(predictor: Predictor, limits: ServeConfig, top_k: int, token: str | None = None) -> dict:
    """What `serve` gives uvicorn: the app, the address, and uvicorn's own limits beside ours (protocol). Tests
    run the same settings in a uvicorn.Server on a thread, so that mutmut sees the routes run."""
    app = create_app(predictor, limits, top_k, token)
    return {
        "app": app,
        "host": limits.host,
        "port": limits.port,
        "log_level": "info",
        "timeout_keep_alive": limits.keep_alive_s,
        "http": protocol(limits, app.state.metrics),
        "timeout_graceful_shutdown": limits.shutdown_grace_s,
    }


def serve(predictor: Predictor, limits: ServeConfig, top_k: int, token: str | None = None) -> None:
    import uvicorn

    settings = uvicorn_settings(predictor, limits, top_k, token)
    log.info("every route but the health routes needs the bearer token" if token else "no bearer token is set")
    # Everything loaded so far (FastAPI, onnxruntime, the model, MLflow's client) lives as long as the process:
    # move it out of the collector's reach, so that a request that parses a large JSON body does not set off a
    # full collection that walks all of it (the p99 of 64-image JSON requests).
    gc.freeze()
    uvicorn.run(**settings)
