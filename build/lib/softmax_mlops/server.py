"""HTTP inference over onnxruntime: POST /predict, GET /health, GET /metadata.

Bad input always gets a 4xx with a JSON {"error": ...} that says what was wrong, and the service keeps
serving: 400 undecodable JSON or image, 413 too large (body bytes or instance count), 415 unsupported
content type, 422 JSON that is not 28x28 integers in 0..255. Inference slower than the time limit gets 503.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .errors import PipelineError
from .inference import Predictor

IMAGE_TYPES = ("image/png", "image/jpeg")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _read_body(request: Request, limit: int) -> bytes:
    """Read at most ``limit`` bytes: a declared Content-Length over it is refused before reading anything."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_instances(body: bytes, max_instances: int) -> np.ndarray:
    """{"instances": [28x28 integers in 0..255, ...]} -> uint8 [N, 28, 28]. Flat 784-long lists are accepted too."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest(422, 'expected a JSON object {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(422, '"instances" must be a non-empty list of 28x28 images')
    if len(instances) > max_instances:
        raise BadRequest(413, f"{len(instances)} instances is over the limit of {max_instances} per request")
    try:
        array = np.asarray(instances)
    except (ValueError, OverflowError):
        raise BadRequest(422, "every instance must be a 28x28 list of integers (rows of unequal length)") from None
    if array.dtype.kind not in "iuf" or array.dtype.kind == "b":
        raise BadRequest(422, "pixel values must be numbers (integers 0..255)")
    if array.shape[1:] == (784,):
        array = array.reshape(-1, 28, 28)
    if array.shape[1:] != (28, 28):
        raise BadRequest(422, f"each instance must be 28x28 (or 784 long); got shape {list(array.shape[1:])}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise BadRequest(422, "pixel values must be finite integers; found NaN or infinity")
        if (array != np.round(array)).any():
            raise BadRequest(422, "pixel values must be integers 0..255; found fractions")
    if array.min() < 0 or array.max() > 255:
        raise BadRequest(422, f"pixel values must be in 0..255; found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
            return np.asarray(pixels, dtype=np.uint8)[None]
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest(400, "the uploaded file is not a readable PNG or JPEG image") from None


async def _images_from(request: Request, limits: ServeConfig) -> np.ndarray:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data", *IMAGE_TYPES):
        raise BadRequest(415, f"unsupported content type {content_type or '(none)'!r}: send application/json "
                              "{\"instances\": [...]}, an image/png or image/jpeg body, or a multipart file upload")
    body = await _read_body(request, limits.max_body_bytes)
    if content_type == "application/json":
        return parse_instances(body, limits.max_instances)
    if content_type in IMAGE_TYPES:
        return decode_image(body)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
    except Exception:  # noqa: BLE001 - python-multipart raises several types for malformed bodies
        raise BadRequest(400, "malformed multipart body") from None
    uploads = [v for v in form.values() if hasattr(v, "read")]
    if not uploads:
        raise BadRequest(422, "the multipart body holds no file: upload the image as a file field")
    return decode_image(await uploads[0].read())


def create_app(predictor: Predictor, limits: ServeConfig, top_k: int = 3) -> FastAPI:
    app = FastAPI(title="softmax-mlops inference", version="1",
                  description="Fashion-MNIST softmax regression, served by onnxruntime.")

    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict:
        return predictor.metadata

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        images = await _images_from(request, limits)
        try:
            ids, probabilities = await asyncio.wait_for(
                run_in_threadpool(predictor.top_k, images, top_k), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"inference took longer than {limits.request_timeout_s} s"}, status_code=503)
        return {"predictions": predictor.describe(ids, probabilities)}

    return app


def serve(predictor: Predictor, limits: ServeConfig, top_k: int = 3) -> None:
    import uvicorn

    if limits.max_body_bytes < 1 or limits.max_instances < 1 or limits.request_timeout_s <= 0:
        raise PipelineError("serve limits must be positive")
    uvicorn.run(create_app(predictor, limits, top_k), host=limits.host, port=limits.port, log_level="info",
                timeout_keep_alive=5)
