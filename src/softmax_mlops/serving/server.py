"""HTTP inference over onnxruntime: POST /predict, GET /health, GET /metadata; the Open Inference Protocol
(KServe v2) under /v2; and MLflow's scoring protocol (POST /invocations, GET /ping, GET /version).

Bad input always gets a 4xx with a JSON {"error": ...} that says what was wrong, and the service keeps
serving: 400 undecodable JSON or image, 408 a request that arrives too slowly, 413 too large (body bytes,
instance count, image pixels), 415 unsupported content type, 422 JSON that is not 28x28 integers in 0..255.
Only the server's own limits answer 5xx: inference slower than the time limit (503), and more open
connections than the cap (503). Images are decoded in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import ServeConfig
from .images import ImageError, ImageTooLarge, decode
from .inference import OUTPUT_NAMES, Predictor
from .protocols import HEADER_LENGTH, as_array, check_pixels, load_json
from .protocols import ProtocolError as BadRequest

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg")


class InferenceTimeout(Exception):
    """Inference ran over serve.request_timeout_s: the server's own limit, answered 503."""


class ClientGone(Exception):
    """The client closed the connection before sending its whole request: nobody is left to answer."""


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most ``limit`` bytes within ``timeout`` seconds: a declared Content-Length over the limit is
    refused before reading anything, and a body that trickles in too slowly gets 408."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body is over the {limit}-byte limit")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {timeout} s") from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def parse_instances(body: bytes, max_instances: int) -> np.ndarray:
    """{"instances": [28x28 integers in 0..255, ...]} -> uint8 [N, 28, 28]. Flat 784-long lists are accepted too."""
    payload = load_json(body)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest(422, 'expected a JSON object {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(422, '"instances" must be a non-empty list of 28x28 images')
    if len(instances) > max_instances:
        raise BadRequest(413, f"{len(instances)} instances is over the limit of {max_instances} per request")
    array = as_array(instances, "every instance (28x28 integers)")
    if array.shape[1:] not in ((784,), (28, 28)):
        raise BadRequest(422, f"each instance must be 28x28 (or 784 long); got shape {list(array.shape[1:])}")
    return check_pixels(array, max_instances)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return decode(data, max_pixels)[None]
    except ImageError as exc:
        raise BadRequest(413 if isinstance(exc, ImageTooLarge) else 400, f"the uploaded file: {exc}") from None


async def _images_from(request: Request, limits: ServeConfig) -> np.ndarray:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data", *IMAGE_TYPES):
        raise BadRequest(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send application/json "
            '{"instances": [...]}, an image/png or image/jpeg body, or a multipart file upload',
        )
    body = await _read_body(request, limits.max_body_bytes, limits.read_timeout_s)
    if content_type == "application/json":
        return await run_in_threadpool(parse_instances, body, limits.max_instances)
    if content_type in IMAGE_TYPES:
        return await run_in_threadpool(decode_image, body, limits.max_image_pixels)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
        raise BadRequest(400, "malformed multipart body") from None
    uploads = [v for v in form.values() if hasattr(v, "read")]
    if not uploads:
        raise BadRequest(422, "the multipart body holds no file: upload the image as a file field")
    return await run_in_threadpool(decode_image, await uploads[0].read(), limits.max_image_pixels)


ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
ERRORS = {
    400: "undecodable JSON or image",
    408: "request too slow",
    413: "too large",
    415: "unsupported type",
    422: "not 28x28 integers in 0..255",
    503: "inference over the time limit",
}
_IMAGE = {
    "type": "array",
    "minItems": 28,
    "maxItems": 28,
    "items": {
        "type": "array",
        "minItems": 28,
        "maxItems": 28,
        "items": {"type": "integer", "minimum": 0, "maximum": 255},
    },
}
_FILE = {"type": "string", "format": "binary"}


def predict_body(max_instances: int) -> dict:
    """/predict's request body for the OpenAPI document. The route reads its body itself (three content types,
    size and time limits), so FastAPI cannot infer the schema: it is described here, for clients and for
    schemathesis-style fuzzers, with the instance limit the service was started with (serve.max_instances)."""
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {
                        "instances": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": max_instances,
                            "items": {
                                "oneOf": [
                                    _IMAGE,
                                    {
                                        "type": "array",
                                        "minItems": 784,
                                        "maxItems": 784,
                                        "items": {"type": "integer", "minimum": 0, "maximum": 255},
                                    },
                                ]
                            },
                        }
                    },
                }
            },
            "image/png": {"schema": _FILE},
            "image/jpeg": {"schema": _FILE},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _FILE}, "required": ["file"]}},
        },
    }


def create_app(predictor: Predictor, limits: ServeConfig, top_k: int) -> FastAPI:
    from .. import __version__
    from . import protocols

    app = FastAPI(
        title="softmax-mlops inference",
        version="1",
        description="Fashion-MNIST softmax regression, served by onnxruntime: its own /predict, the Open "
        "Inference Protocol (KServe v2) under /v2, and MLflow's scoring protocol "
        "(/invocations, /ping, /version).",
    )
    model_name = predictor.metadata.get("registered_model") or "softmax-mlops"

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        if request.url.path == "/invocations":  # MLflow's error shape; it answers bad input with 400
            status = exc.status if exc.status in (408, 413, 415) else 400
            return JSONResponse({"error_code": exc.code, "message": exc.message}, status_code=status)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep the exception's headers: a 405 must say which methods are allowed (Allow)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, _: ClientGone) -> JSONResponse:
        log.info("client %s disconnected before sending its whole request", request.client)
        return JSONResponse({"error": "client disconnected"}, status_code=400)

    async def run_model(images: np.ndarray) -> dict[str, np.ndarray]:
        """Both outputs, in a worker thread, within the time limit (else 503: the server's limit, not the
        client's input)."""
        try:
            results = await asyncio.wait_for(run_in_threadpool(predictor.run, images), timeout=limits.request_timeout_s)
        except TimeoutError:
            raise InferenceTimeout(f"inference took longer than {limits.request_timeout_s} s") from None
        return dict(zip(OUTPUT_NAMES, results, strict=True))

    @app.exception_handler(InferenceTimeout)
    async def _timeout(_: Request, exc: InferenceTimeout) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    async def body_of(request: Request, *allowed: str) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in allowed:
            raise BadRequest(415, f"unsupported content type {content_type!r}: send {' or '.join(allowed)}")
        return await _read_body(request, limits.max_body_bytes, limits.read_timeout_s)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict:
        return predictor.metadata

    @app.post(
        "/predict",
        openapi_extra={"requestBody": predict_body(limits.max_instances)},
        responses={
            code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for code, text in ERRORS.items()
        },
    )
    async def predict(request: Request) -> JSONResponse:
        images = await _images_from(request, limits)
        probabilities = (await run_model(images))["probabilities"]
        # a Response as is: FastAPI would otherwise walk every number through jsonable_encoder first
        return JSONResponse({"predictions": predictor.describe(*predictor.top_k_of(probabilities, top_k))})

    # --- Open Inference Protocol (KServe v2 REST) ---
    def known(name: str) -> None:
        if name != model_name:
            raise BadRequest(404, f"unknown model {name!r}: this server has {model_name!r}")

    @app.get("/v2")
    async def v2_server() -> dict:
        return {"name": "softmax-mlops", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready() -> dict:
        return {"ready": True}  # the model is loaded before the server starts listening

    @app.get("/v2/models/{name}")
    async def v2_model(name: str) -> dict:
        known(name)
        return protocols.v2_model_metadata(model_name)

    @app.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> dict:
        known(name)
        return {"name": model_name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> Response:
        known(name)
        body = await body_of(request, "application/json", "application/octet-stream")
        parsed = await run_in_threadpool(
            protocols.parse_v2, body, request.headers.get(HEADER_LENGTH), limits.max_instances
        )
        content, headers = protocols.encode_v2(model_name, parsed, await run_model(parsed.images))
        return Response(content, headers=headers)

    # --- MLflow scoring protocol (mlflow models serve) ---
    @app.get("/ping")
    async def ping() -> Response:
        return Response("\n", media_type="application/json")

    @app.get("/version")
    async def version() -> Response:
        from importlib.metadata import version as installed

        return Response(installed("mlflow-skinny"), media_type="text/plain")

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        body = await body_of(request, "application/json")
        images = await run_in_threadpool(protocols.parse_mlflow, body, limits.max_instances)
        return JSONResponse(protocols.encode_mlflow(await run_model(images)))

    return app


def protocol(limits: ServeConfig) -> type:
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


def uvicorn_settings(predictor: Predictor, limits: ServeConfig, top_k: int) -> dict:
    """What `serve` gives uvicorn: the app, the address, and uvicorn's own limits beside ours (protocol). Tests
    run the same settings in a uvicorn.Server on a thread, so that mutmut sees the routes run."""
    return {
        "app": create_app(predictor, limits, top_k),
        "host": limits.host,
        "port": limits.port,
        "log_level": "info",
        "timeout_keep_alive": limits.keep_alive_s,
        "http": protocol(limits),
        "timeout_graceful_shutdown": limits.shutdown_grace_s,
    }


def serve(predictor: Predictor, limits: ServeConfig, top_k: int) -> None:
    import uvicorn

    settings = uvicorn_settings(predictor, limits, top_k)
    # Everything loaded so far (FastAPI, onnxruntime, the model, MLflow's client) lives as long as the process:
    # move it out of the collector's reach, so that a request that parses a large JSON body does not set off a
    # full collection that walks all of it (the p99 of 64-image JSON requests).
    gc.freeze()
    uvicorn.run(**settings)
