"""What every protocol's routes share: reading a body within the size and time limits, the content-type
check, running the model within its time limit, and the two failures that are not the client's input's fault.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..config import ServeConfig
from .inference import OUTPUT_NAMES, Predictor
from .metrics import Metrics
from .protocols import ProtocolError as BadRequest


class InferenceTimeout(Exception):
    """Inference ran over serve.request_timeout_s: the server's own limit, answered 503."""


class ClientGone(Exception):
    """The client closed the connection before sending its whole request: nobody is left to answer."""


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most ``limit`` bytes within ``timeout`` seconds: a declared Content-Length over the limit is
    refused before reading anything, and a body that trickles in too slowly gets 408."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {declared} bytes is over the {limit}-byte limit", limit="body_bytes")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body is over the {limit}-byte limit", limit="body_bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {timeout} s", limit="read_timeout") from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


@dataclass(frozen=True)
class Served:
    """The one model a server serves, with the limits it was started with: what each protocol's router gets."""

    predictor: Predictor
    limits: ServeConfig
    top_k: int
    model_name: str
    metrics: Metrics | None = None

    async def run_model(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Both outputs, in a worker thread, within the time limit (else 503: the server's limit, not the
        client's input)."""
        timeout = self.limits.request_timeout_s
        Metrics.inference_started()
        try:
            results = await asyncio.wait_for(run_in_threadpool(self.predictor.run, images), timeout=timeout)
        except TimeoutError:
            raise InferenceTimeout(f"inference took longer than {timeout} s") from None
        Metrics.inference_ended()
        if self.metrics is not None:
            self.metrics.predicted(results[1])
        return dict(zip(OUTPUT_NAMES, results, strict=True))

    async def body_of(self, request: Request, *allowed: str) -> bytes:
        """The body, if its content type is one of ``allowed`` (or none is declared); else 415."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in allowed:
            raise BadRequest(415, f"unsupported content type {content_type!r}: send {' or '.join(allowed)}")
        return await read_body(request, self.limits.max_body_bytes, self.limits.read_timeout_s)
