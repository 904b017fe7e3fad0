"""MLflow's scoring protocol, as `mlflow models serve` speaks it: POST /invocations, GET /ping, GET /version.

Its parser, its encoder and its router; MLflow's own error shape ({"error_code", "message"}, 400 for input it
cannot use) is given by `refusal`, which server.py's error handler calls for these paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..inference import OUTPUT_NAMES
from . import INVALID, ProtocolError, as_array, check_pixels, load_json

if TYPE_CHECKING:
    from ..http import Served

PATHS = ("/invocations",)  # the routes whose refusals take MLflow's error shape

MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")


def parse_mlflow(body: bytes, max_instances: int) -> np.ndarray:
    """What `mlflow models serve` takes for this model's tensor signature (``image``: uint8 [-1, 28, 28]):
    ``{"inputs": images}``, ``{"inputs": {"image": images}}``, ``{"instances": images}`` or
    ``{"instances": [{"image": image}, ...]}``. MLflow refuses [N, 784], and so does this."""
    payload = load_json(body)
    keys = [k for k in MLFLOW_FORMATS if isinstance(payload, dict) and k in payload]
    if len(keys) != 1:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ProtocolError(
            400,
            f"The input must be a JSON dictionary with exactly one of the input fields "
            f"{set(MLFLOW_FORMATS)}. Received: {found}.",
        )
    key, value = keys[0], payload[keys[0]]
    if key.startswith("dataframe"):
        raise ProtocolError(
            400,
            f"{key} does not fit this model's tensor input 'image' (uint8 [-1, 28, 28]): "
            'send {"inputs": [[28 rows of 28 pixels], ...]}',
            INVALID,
        )
    if key == "inputs" and isinstance(value, dict):
        if set(value) != {"image"}:
            raise ProtocolError(400, f"inputs must name the one input 'image', got {sorted(value)}", INVALID)
        value = value["image"]
    elif key == "instances" and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if any(set(v) != {"image"} for v in value):
            raise ProtocolError(400, "each instance must hold the one input 'image'", INVALID)
        value = [v["image"] for v in value]
    return check_pixels(as_array(value, key), max_instances, flat_ok=False)


def encode_mlflow(results: dict[str, np.ndarray]) -> dict:
    return {"predictions": {name: results[name].tolist() for name in OUTPUT_NAMES}}


def refusal(exc: ProtocolError) -> JSONResponse:
    """MLflow's error shape; it answers bad input with 400 (but keeps the transport's 408, 413 and 415)."""
    status = exc.status if exc.status in (408, 413, 415) else 400
    return JSONResponse({"error_code": exc.code, "message": exc.message}, status_code=status)


def router(served: Served) -> APIRouter:
    routes = APIRouter()

    @routes.get("/ping")
    async def ping() -> Response:
        return Response("\n", media_type="application/json")

    @routes.get("/version")
    async def version() -> Response:
        from importlib.metadata import version as installed

        return Response(installed("mlflow-skinny"), media_type="text/plain")

    @routes.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        body = await served.body_of(request, "application/json")
        images = await run_in_threadpool(parse_mlflow, body, served.limits.max_instances)
        return JSONResponse(encode_mlflow(await served.run_model(images)))

    return routes
