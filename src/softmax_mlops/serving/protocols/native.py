"""The service's own protocol: POST /predict (JSON {"instances": [...]}, a PNG or JPEG body, or a multipart
upload), GET /health and GET /metadata. Its parser, the request body's schema for the OpenAPI document, and
its router. Images are decoded in a worker thread, never on the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..http import read_body
from ..images import ImageError, ImageTooLarge, decode
from . import ProtocolError as BadRequest
from . import as_array, check_pixels, load_json

if TYPE_CHECKING:
    from ...config import ServeConfig
    from ..http import Served

IMAGE_TYPES = ("image/png", "image/jpeg")


def parse_instances(body: bytes, max_instances: int) -> np.ndarray:
    """{"instances": [28x28 integers in 0..255, ...]} -> uint8 [N, 28, 28]. Flat 784-long lists are accepted too."""
    payload = load_json(body)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest(422, 'expected a JSON object {"instances": [image, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(422, '"instances" must be a non-empty list of 28x28 images')
    if len(instances) > max_instances:
        raise BadRequest(
            413, f"{len(instances)} instances is over the limit of {max_instances} per request", limit="instances"
        )
    array = as_array(instances, "every instance (28x28 integers)")
    if array.shape[1:] not in ((784,), (28, 28)):
        raise BadRequest(422, f"each instance must be 28x28 (or 784 long); got shape {list(array.shape[1:])}")
    return check_pixels(array, max_instances)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return decode(data, max_pixels)[None]
    except ImageError as exc:
        too_large = isinstance(exc, ImageTooLarge)
        raise BadRequest(
            413 if too_large else 400, f"the uploaded file: {exc}", limit="image_pixels" if too_large else None
        ) from None


async def images_from(request: Request, limits: ServeConfig) -> np.ndarray:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data", *IMAGE_TYPES):
        raise BadRequest(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send application/json "
            '{"instances": [...]}, an image/png or image/jpeg body, or a multipart file upload',
        )
    body = await read_body(request, limits.max_body_bytes, limits.read_timeout_s)
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


def router(served: Served) -> APIRouter:
    routes = APIRouter()
    predictor = served.predictor

    @routes.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @routes.get("/metadata")
    async def metadata() -> dict:
        return predictor.metadata

    @routes.post(
        "/predict",
        openapi_extra={"requestBody": predict_body(served.limits.max_instances)},
        responses={
            code: {"description": text, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for code, text in ERRORS.items()
        },
    )
    async def predict(request: Request) -> JSONResponse:
        images = await images_from(request, served.limits)
        probabilities = (await served.run_model(images))["probabilities"]
        # a Response as is: FastAPI would otherwise walk every number through jsonable_encoder first
        return JSONResponse({"predictions": predictor.describe(*predictor.top_k_of(probabilities, served.top_k))})

    return routes
