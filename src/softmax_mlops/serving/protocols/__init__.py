"""The inference protocols the service speaks, one module each, over the same model and the same limits:

- `native`: the service's own `/predict` (JSON instances, a PNG or JPEG body, or a multipart upload), with
  `/health` and `/metadata`;
- `v2`: the **Open Inference Protocol** (KServe v2, REST), spoken by Triton, Seldon MLServer, KServe and
  OpenVINO Model Server clients: tensors as JSON (`data` flat or nested), or in the binary tensor extension that
  `tritonclient` uses by default (a JSON header of `Inference-Header-Content-Length` bytes, then raw tensors);
- `mlflow_scoring`: **MLflow's scoring protocol** (`mlflow models serve`): `{"inputs": ...}` or
  `{"instances": ...}` in, `{"predictions": {"logits": ..., "probabilities": ...}}` out, and MLflow's own error
  shape, as MLflow 3.17's server answers for the registered ONNX model.

Each module holds its parser and its router; server.py only assembles the routers, with the shared limits and
error handling (serving/http.py). Here: what every parser shares, and the one error type that may leave one.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

INVALID = "INVALID_PARAMETER_VALUE"  # MLflow's error code for input that does not fit the model's signature


class ProtocolError(Exception):
    """Bad input: the status to answer and a message that says what was wrong, and the error code MLflow's
    scoring server gives the same fault: BAD_REQUEST for a request it cannot read (malformed JSON, a missing
    field, values out of range), INVALID_PARAMETER_VALUE for one that does not fit the signature (its shape,
    the input's name, a dataframe for a tensor input)."""

    def __init__(self, status: int, message: str, code: str = "BAD_REQUEST", limit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.limit = limit  # the server's limit that refused it (a metric's label), or None for a bad input


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(400, "malformed JSON: nested too deeply") from None


def as_array(values: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (ValueError, OverflowError, TypeError, RecursionError):
        raise ProtocolError(422, f"{what} must be a rectangular array of integers (rows of unequal length)") from None
    if array.dtype.kind not in "iuf":
        raise ProtocolError(422, f"{what}: pixel values must be numbers (integers 0..255)")
    return array


def check_pixels(array: np.ndarray, max_instances: int, flat_ok: bool = True) -> np.ndarray:
    """[N, 28, 28] (or [N, 784] when ``flat_ok``) integers in 0..255, at most ``max_instances``: as uint8."""
    if array.ndim >= 1 and len(array) > max_instances:
        raise ProtocolError(
            413, f"{len(array)} images is over the limit of {max_instances} per request", limit="instances"
        )
    if flat_ok and array.shape[1:] == (784,):
        array = array.reshape(-1, 28, 28)
    if array.ndim != 3 or array.shape[1:] != (28, 28) or not len(array):
        shapes = "[N, 28, 28] or [N, 784]" if flat_ok else "[N, 28, 28]"
        raise ProtocolError(422, f"images must have shape {shapes} with N >= 1; got {list(array.shape)}", INVALID)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ProtocolError(422, "pixel values must be finite integers; found NaN or infinity")
        if (array != np.round(array)).any():
            raise ProtocolError(422, "pixel values must be integers 0..255; found fractions")
    if array.min() < 0 or array.max() > 255:
        raise ProtocolError(422, f"pixel values must be in 0..255; found {array.min()}..{array.max()}")
    return array.astype(np.uint8, copy=False)
