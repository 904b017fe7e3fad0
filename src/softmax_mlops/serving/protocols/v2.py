"""The Open Inference Protocol (KServe v2, REST) under /v2: its parser, its encoder and its router.

The request is parsed by typed pydantic models, as KServe's own Python server parses v2: every field has a
declared type (strict: no 1 for true, no "5" for 5) and bounds, so that a JSON value of the wrong type, or a
dimension past what numpy can index, is refused before any code uses it. A validation error is turned into
the one line that names the field (`_v2_refusal`): only ProtocolError leaves the parser.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from ..inference import OUTPUT_NAMES
from . import ProtocolError, as_array, check_pixels, load_json

if TYPE_CHECKING:
    from ..http import Served

# KServe v2 datatypes a pixel array may arrive in; every value must still be an integer in 0..255
V2_DTYPES = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}
HEADER_LENGTH = "inference-header-content-length"

MAX_DIMS = 8  # a tensor shape longer than this is no image batch
MAX_DIM = 2**31 - 1  # a dimension past this is no image batch either, and numpy could not index it
MAX_HEADER_DIGITS = 18  # an Inference-Header-Content-Length past this is past any body size (and int() limits)

_Dim = Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]
_Count = Annotated[StrictInt, Field(ge=0)]


class _V2Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class V2TensorParameters(_V2Part):
    binary_data_size: _Count | None = None


class V2InputTensor(_V2Part):
    name: Literal["image"]
    datatype: StrictStr
    shape: Annotated[list[_Dim], Field(max_length=MAX_DIMS)]
    data: Any = None  # checked by as_array (nested numbers); its presence by model_fields_set
    parameters: V2TensorParameters | None = None


class V2OutputParameters(_V2Part):
    binary_data: StrictBool | None = None
    classification: Any = None


class V2RequestedOutput(_V2Part):
    name: Literal[OUTPUT_NAMES]  # type: ignore[valid-type]
    parameters: V2OutputParameters | None = None


class V2RequestParameters(_V2Part):
    binary_data_output: StrictBool = False


class V2InferenceRequest(_V2Part):
    inputs: Annotated[list[V2InputTensor], Field(min_length=1, max_length=1)]
    parameters: V2RequestParameters | None = None
    outputs: Annotated[list[V2RequestedOutput], Field(min_length=1)] | None = None
    id: StrictStr | None = None


@dataclass
class V2Request:
    images: np.ndarray
    outputs: dict[str, bool]  # requested output -> as binary data
    id: str | None = None


def _show(value: Any, limit: int = 60) -> str:
    """A client's value in a message: its repr, cut short (a hostile one may be megabytes)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's limit for int -> str
        text = f"<an integer of more than {sys.get_int_max_str_digits()} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _at(document: Any, loc: tuple) -> Any:
    """The value at a validation error's location; None where it is missing."""
    for key in loc:
        try:
            document = document[key]
        except (KeyError, IndexError, TypeError):
            return None
    return document


def _v2_refusal(document: Any, error: ValidationError) -> ProtocolError:
    """The one line for the first field that failed, in the words a v2 client needs. pydantic names the field
    by its path (``("inputs", 0, "shape", 1)``); the message depends on the field, and shows the client's
    value."""
    first = error.errors()[0]
    loc = first["loc"]
    if not loc or (loc == ("inputs",) and not isinstance(document.get("inputs"), list)):
        return ProtocolError(400, 'expected a JSON object with "inputs": [{"name": "image", ...}]')
    value = _show(_at(document, loc))
    if loc[-1] == "parameters":
        return ProtocolError(400, f'"parameters" must be a JSON object, got {value}')
    if loc[-1] in ("binary_data", "binary_data_output"):
        return ProtocolError(400, f"parameter {loc[-1]!r} must be true or false")
    if loc[-1] == "binary_data_size":
        return ProtocolError(400, f"binary_data_size must be a non-negative integer, got {value}")
    if loc[-1] == "datatype":
        return ProtocolError(400, f"input datatype {value} is not supported: {_SEND}")
    if loc[0] == "inputs" and "shape" in loc:
        shape = _show(_at(document, loc[:3]))
        if first["type"] in ("less_than_equal", "too_long"):
            return ProtocolError(400, f"input shape {shape} is past {MAX_DIMS} dimensions of at most {MAX_DIM} each")
        return ProtocolError(400, f"input shape must be a list of non-negative integers, got {shape}")
    if loc[0] == "inputs":
        return ProtocolError(400, 'this model has one input, "image" (UINT8 [-1, 28, 28])')
    if loc[-1] == "name":
        return ProtocolError(400, f"unknown output {value}: this model has {', '.join(OUTPUT_NAMES)}")
    if loc[0] == "outputs":
        return ProtocolError(400, '"outputs" must be a non-empty list of {"name": ...}')
    return ProtocolError(400, '"id" must be a string')


_SEND = "send UINT8 (or another integer or FP type holding integers 0..255)"


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensors after it (the binary tensor extension)."""
    if header_length is None:
        return body, b""
    fits = header_length.isascii() and header_length.isdigit() and len(header_length) <= MAX_HEADER_DIGITS
    if not fits or int(header_length) > len(body):
        raise ProtocolError(
            400, f"Inference-Header-Content-Length {_show(header_length)} does not fit a {len(body)}-byte body"
        )
    return body[: int(header_length)], body[int(header_length) :]


def parse_v2(body: bytes, header_length: str | None, max_instances: int) -> V2Request:
    """An inference request with one input, ``image``, as JSON data or as a binary tensor."""
    body, binary = _split_binary(body, header_length)
    document = load_json(body)
    try:
        request = V2InferenceRequest.model_validate(document)
    except ValidationError as error:
        raise _v2_refusal(document, error) from None
    tensor = request.inputs[0]
    if tensor.datatype not in V2_DTYPES:
        raise ProtocolError(400, f"input datatype {_show(tensor.datatype)} is not supported: {_SEND}")
    shape, dtype = tensor.shape, np.dtype(V2_DTYPES[tensor.datatype])
    count = math.prod(shape)  # Python's integers: a hostile shape cannot overflow into a plausible size
    if shape and shape[0] > max_instances:
        raise ProtocolError(
            413, f"{shape[0]} images is over the limit of {max_instances} per request", limit="instances"
        )
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is not None:
        if size != len(binary) or size != count * dtype.itemsize:
            raise ProtocolError(
                400,
                f"binary input of {len(binary)} bytes (binary_data_size {size}) "
                f"does not hold {tensor.datatype} {shape}",
            )
        array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"))
    else:
        if binary:
            raise ProtocolError(400, "binary data after the header, but no input declares binary_data_size")
        if "data" not in tensor.model_fields_set:
            raise ProtocolError(400, 'input "image" has no "data"')
        array = as_array(tensor.data, 'input "image" data')
        if array.size != count:
            raise ProtocolError(400, f"input data holds {array.size} values, shape {shape} needs {count}")
    images = check_pixels(array.reshape(shape), max_instances)
    return V2Request(images, _requested_outputs(request), request.id)


def _requested_outputs(request: V2InferenceRequest) -> dict[str, bool]:
    default_binary = request.parameters.binary_data_output if request.parameters else False
    if request.outputs is None:
        return dict.fromkeys(OUTPUT_NAMES, default_binary)
    chosen = {}
    for output in request.outputs:
        parameters = output.parameters or V2OutputParameters()
        if parameters.classification:
            raise ProtocolError(400, "the classification extension is not supported: ask for probabilities")
        chosen[output.name] = default_binary if parameters.binary_data is None else parameters.binary_data
    return chosen


def encode_v2(model_name: str, request: V2Request, results: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, with binary outputs appended after the JSON header if asked for."""
    outputs, buffers = [], []
    for name, as_binary in request.outputs.items():
        array = np.ascontiguousarray(results[name], dtype="<f4")
        output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if as_binary:
            buffers.append(array.tobytes())
            output["parameters"] = {"binary_data_size": len(buffers[-1])}
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    response: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not buffers:
        return header, {"content-type": "application/json"}
    return header + b"".join(buffers), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def v2_model_metadata(model_name: str) -> dict:
    return {
        "name": model_name,
        "versions": [],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, 10]} for name in OUTPUT_NAMES],
    }


def router(served: Served) -> APIRouter:
    """/v2, its health, the model's metadata and readiness, and inference, for the one model served."""
    from ... import __version__

    routes = APIRouter()
    model_name = served.model_name

    def known(name: str) -> None:
        if name != model_name:
            raise ProtocolError(404, f"unknown model {name!r}: this server has {model_name!r}")

    @routes.get("/v2")
    async def v2_server() -> dict:
        return {"name": "softmax-mlops", "version": __version__, "extensions": ["binary_tensor_data"]}

    @routes.get("/v2/health/live")
    async def v2_live() -> dict:
        return {"live": True}

    @routes.get("/v2/health/ready")
    async def v2_ready() -> dict:
        return {"ready": True}  # the model is loaded before the server starts listening

    @routes.get("/v2/models/{name}")
    async def v2_model(name: str) -> dict:
        known(name)
        return v2_model_metadata(model_name)

    @routes.get("/v2/models/{name}/ready")
    async def v2_model_ready(name: str) -> dict:
        known(name)
        return {"name": model_name, "ready": True}

    @routes.post("/v2/models/{name}/infer")
    async def v2_infer(name: str, request: Request) -> Response:
        known(name)
        body = await served.body_of(request, "application/json", "application/octet-stream")
        parsed = await run_in_threadpool(
            parse_v2, body, request.headers.get(HEADER_LENGTH), served.limits.max_instances
        )
        content, headers = encode_v2(model_name, parsed, await served.run_model(parsed.images))
        return Response(content, headers=headers)

    return routes
