"""The Open Inference Protocol (KServe v2, Triton's HTTP API) for every deployment.

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    probes (ready: every deployment has a replica)
    GET  /v2/models/{model}[/versions/{v}]     model metadata: its input and output tensors
    GET  /v2/models/{model}[/versions/{v}]/ready
    POST /v2/models/{model}[/versions/{v}]/infer

A deployment is one model; its tensor handler is the one serving OpenAI embeddings, else its
first batched handler, else its first (request parameter `handler` picks another). Inputs
are the handler's parameters as named tensors:

    batched handler, items are objects   one tensor per field, shape [N] (the risk model:
                                         account_id INT64, amount FP32, merchant_category
                                         BYTES, hour INT64)
    batched handler, items are scalars   one tensor named as the parameter, shape [N] (the
                                         embedding model: texts BYTES)
    plain handler                        one tensor per parameter: [1] for a scalar, [N] for
                                         a list of scalars

and each result field is an output tensor stacked over the N items (embedding FP32 [N, 384],
tokens INT64 [N]; the risk model's score FP64, decision BYTES, top_features BYTES of JSON: a
field that is not numbers, strings or booleans travels as each item's JSON). In, str is
BYTES, int INT64, float FP32 (any numeric datatype is accepted), bool BOOL. Tensors come as
JSON `data` or with the binary data extension (`Inference-Header-Content-Length`,
`binary_data_size`; BYTES elements as 4-byte little-endian lengths and their bytes), and
outputs go back binary when asked
(`binary_data` per output, or `binary_data_output` for all). The call itself is the native
one (validation, cache, admission, dispatch). Errors are the protocol's `{"error": "..."}`
with the same status codes as the native API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .. import __version__
from ..errors import ClientError, HandlerFailed, NoReadyReplica, NotFound
from .access import Access
from .http import Request, Response, json_response
from .membership import Deployment, Handler
from .routes import await_handlers, call, check_items, find_deployment

if TYPE_CHECKING:
    from .plane import DataPlane

HEADER_LENGTH = b"inference-header-content-length"
MAX_NAME_CHARS = 256
MAX_DIMS = 8
# datatype -> numpy dtype of its binary form (little-endian); BYTES is length-prefixed
BINARY = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPES = frozenset(BINARY) | {"BYTES"}
KIND_TYPES = {"str": "BYTES", "bytes": "BYTES", "int": "INT64", "float": "FP32", "bool": "BOOL"}
SCALAR_KINDS = frozenset(KIND_TYPES)


@dataclass(frozen=True, slots=True)
class Spec:
    """One input tensor of a handler: where its values go."""

    name: str
    datatype: str
    shape: list[int]
    kind: str  # the schema kind of one element
    required: bool


def tensor_handler(d: Deployment, name: str | None = None) -> Handler:
    if not d.handlers:
        raise NoReadyReplica(f"model {d.name!r} has no ready replica yet", retry_after_s=1)
    if name is not None:
        h = d.handlers.get(name)
        if h is None:
            raise NotFound(f"model {d.name!r} has no handler {name!r}; it has "
                           f"{sorted(d.handlers)}", param="handler")
        return h
    chosen = d.openai_handler("embeddings") or next(
        (h for h in d.handlers.values() if h.spec.options.batch), None)
    return chosen or next(iter(d.handlers.values()))


def input_specs(h: Handler) -> list[Spec] | None:
    """The handler's inputs as tensors; None when a parameter is not expressible as one."""
    params = h.spec.params
    if h.spec.options.batch:
        item = params[0]["type"].get("item", {"kind": "any"})
        if item["kind"] == "object":
            fields = item["fields"]
            required = set(item.get("required", []))
            specs = [_spec(name, t, [-1], name in required) for name, t in fields.items()]
            return None if any(s is None for s in specs) else specs  # type: ignore[return-value]
        one = _spec(params[0]["name"], item, [-1], True)
        return None if one is None else [one]
    out = []
    for p in params:
        t = p["type"]
        if t["kind"] == "list":
            spec = _spec(p["name"], t.get("item", {"kind": "any"}), [-1], bool(p["required"]))
        else:
            spec = _spec(p["name"], t, [1], bool(p["required"]))
        if spec is None:
            return None
        out.append(spec)
    return out


def _spec(name: str, t: dict[str, Any], shape: list[int], required: bool) -> Spec | None:
    kind = t["kind"]
    if kind == "optional":
        kind, required = t.get("item", {}).get("kind", "any"), False
    if kind not in SCALAR_KINDS:
        return None
    return Spec(name, KIND_TYPES[kind], shape, kind, required)


# --- the request -------------------------------------------------------------------------------
INFER_SCHEMA: dict[str, Any] = {  # what parse_infer accepts (its JSON part), for /openapi.json
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                "shape": {"type": "array", "maxItems": MAX_DIMS,
                          "items": {"type": "integer", "minimum": 0}},
                "datatype": {"enum": sorted(DATATYPES)},
                "data": {"type": "array"},
                "parameters": {"type": "object"},
            }}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request's JSON part, {input name: flat list of values}) or ClientError."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ClientError("Inference-Header-Content-Length must be a whole number") from None
        if not 0 < n <= len(body):
            raise ClientError(f"Inference-Header-Content-Length {n} is outside the body of "
                              f"{len(body)} bytes")
        head, blob = body[:n], memoryview(body)[n:]
    else:
        head, blob = body, memoryview(b"")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"invalid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ClientError("the inference request must be a JSON object with 'inputs'")
    if "id" in request and not isinstance(request["id"], str):
        raise ClientError("'id' must be a string", param="id")
    if "parameters" in request and not isinstance(request["parameters"], dict):
        raise ClientError("'parameters' must be an object", param="parameters")
    outputs = request.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str)
            and isinstance(o.get("parameters", {}), dict) for o in outputs)):
        raise ClientError("'outputs' must be a list of {name, parameters}", param="outputs")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ClientError("'inputs' must be a non-empty list of tensors", param="inputs")
    values: dict[str, Any] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        name, datatype, shape, size = _tensor_head(tensor, f"inputs[{i}]")
        if name in values:
            raise ClientError(f"input {name!r} is given twice", param=name)
        binary = _parameters(tensor).get("binary_data_size")
        if binary is not None:
            if type(binary) is not int or binary < 0 or offset + binary > len(blob):
                raise ClientError(f"input {name!r}: binary_data_size {binary!r} is outside the "
                                  "binary part of the body", param=name)
            flat = _from_binary(blob[offset:offset + binary], datatype, name)
            offset += binary
        else:
            flat = _flatten(tensor.get("data"), name)
        if len(flat) != size:
            raise ClientError(f"input {name!r} has {len(flat)} elements; its shape {shape} "
                              f"holds {size}", param=name)
        values[name] = (datatype, flat)
    if offset != len(blob):
        raise ClientError(f"{len(blob) - offset} bytes of binary data belong to no input")
    return request, values


def _tensor_head(tensor: Any, where: str) -> tuple[str, str, list[int], int]:
    if not isinstance(tensor, dict):
        raise ClientError(f"{where} must be a tensor object (name, shape, datatype, data)")
    if not isinstance(tensor.get("parameters", {}), dict):
        raise ClientError(f"{where}: 'parameters' must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ClientError(f"{where}: 'name' must be a string of 1 to {MAX_NAME_CHARS} characters")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ClientError(f"input {name!r}: unknown datatype {str(datatype)[:20]!r}; one of "
                          f"{sorted(DATATYPES)}", param=name)
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            type(s) is int and s >= 0 for s in shape):
        raise ClientError(f"input {name!r}: 'shape' must be a list of at most {MAX_DIMS} "
                          "non-negative integers", param=name)
    return name, str(datatype), shape, math.prod(shape)


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise ClientError(f"input {name!r}: 'data' (a list) or binary data is required",
                          param=name)
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) > MAX_DIMS:
                    raise ClientError(f"input {name!r}: data nested deeper than {MAX_DIMS}",
                                      param=name)
                stack.append(iter(v))
                break
            flat.append(v)
        else:
            stack.pop()
    return flat


def _from_binary(raw: memoryview, datatype: str, name: str) -> list[Any]:
    if datatype != "BYTES":
        dtype = np.dtype(BINARY[datatype])
        if len(raw) % dtype.itemsize:
            raise ClientError(f"input {name!r}: {len(raw)} bytes are not whole {datatype} "
                              "elements", param=name)
        return list(np.frombuffer(raw, dtype=dtype).tolist())
    out: list[Any] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise ClientError(f"input {name!r}: a BYTES element's length is cut off", param=name)
        n = int.from_bytes(raw[at:at + 4], "little")
        if at + 4 + n > len(raw):
            raise ClientError(f"input {name!r}: a BYTES element runs past its data", param=name)
        out.append(bytes(raw[at + 4:at + 4 + n]))
        at += 4 + n
    return out


def _element(value: Any, spec: Spec, datatype: str) -> Any:
    """One tensor element as the handler's parameter kind; ClientError naming the input."""
    try:
        if spec.kind in ("str", "bytes"):
            if datatype != "BYTES":
                raise ValueError(f"datatype {datatype}, expected BYTES")
            if isinstance(value, bytes):
                return value.decode("utf-8")
            if isinstance(value, str):
                return value
            raise ValueError(f"{type(value).__name__} is not a string")
        if spec.kind == "bool":
            if datatype != "BOOL" or not isinstance(value, bool):
                raise ValueError(f"datatype {datatype}, expected BOOL")
            return value
        if datatype in ("BYTES", "BOOL"):
            raise ValueError(f"datatype {datatype}, expected a number")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        if spec.kind == "int":
            if float(value) != int(value):
                raise ValueError(f"{value!r} is not a whole number")
            return int(value)
        return float(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"input {spec.name!r}: {exc}", param=spec.name) from None


def to_args(h: Handler, specs: list[Spec], values: dict[str, Any]) -> dict[str, Any]:
    """The handler's arguments from the input tensors (then validated as a native call)."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ClientError(f"unknown input {unknown[0]!r}; this model takes "
                          f"{[s.name for s in specs]}", param=unknown[0])
    missing = [s.name for s in specs if s.required and s.name not in values]
    if missing:
        raise ClientError(f"input {missing[0]!r} is required", param=missing[0])
    columns = {name: [_element(v, by_name[name], dt) for v in flat]
               for name, (dt, flat) in values.items()}
    param = h.spec.params
    if h.spec.options.batch:
        item = param[0]["type"].get("item", {})
        lengths = {len(c) for c in columns.values()}
        if len(lengths) != 1:
            raise ClientError(f"batched inputs must have the same number of elements, got "
                              f"{ {n: len(c) for n, c in columns.items()} }")
        if item.get("kind") == "object":
            n = lengths.pop()
            return {param[0]["name"]: [{name: c[i] for name, c in columns.items()}
                                        for i in range(n)]}
        return {param[0]["name"]: next(iter(columns.values()))}
    args: dict[str, Any] = {}
    for name, column in columns.items():
        if by_name[name].shape == [1]:
            if len(column) != 1:
                raise ClientError(f"input {name!r} takes one element, got {len(column)}",
                                  param=name)
            args[name] = column[0]
        else:
            args[name] = column
    return args


# --- the response ------------------------------------------------------------------------------
def output_tensors(result: Any, batched: bool) -> list[tuple[str, np.ndarray]]:
    """(name, array) per result field, stacked over the items. Numbers, booleans, strings
    and equal-shaped numeric arrays become their tensors; any other field (a list of pairs, a
    nested object) becomes BYTES holding each item's value as JSON, so nothing is lost."""
    items = result if batched else [result]
    if not isinstance(items, list) or not items:
        raise HandlerFailed("the handler's result is not a list of items")
    if all(isinstance(it, dict) for it in items):
        keys = list(items[0])
        if any(list(it) != keys for it in items):
            raise HandlerFailed("the handler's items do not all have the same fields")
        columns = {k: [it[k] for it in items] for k in keys}
    else:
        columns = {"output": items}
    return [(name, _column(values)) for name, values in columns.items()]


def _column(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, str) for v in values):
        return np.asarray([v.encode() for v in values], dtype=object)
    if all(isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.bool_)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.float64)
    if all(isinstance(v, np.ndarray) and v.dtype.kind in "iuf" for v in values) \
            and len({v.shape for v in values}) == 1:
        return np.stack(values)
    if all(_numeric_nest(v) for v in values):
        try:
            return np.asarray(values, dtype=np.float64)
        except ValueError:
            pass  # ragged: as JSON below
    return np.asarray([orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY) for v in values],
                      dtype=object)


def _numeric_nest(v: Any) -> bool:
    if isinstance(v, list):
        return all(_numeric_nest(x) for x in v)
    return isinstance(v, int | float) and not isinstance(v, bool)


def _datatype(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    if array.dtype == np.bool_:
        return "BOOL"
    if array.dtype.kind in "iu":
        return "INT64" if array.dtype.kind == "i" else "UINT64"
    if array.dtype.kind == "f":
        return "FP32" if array.dtype.itemsize <= 4 else "FP64"
    raise HandlerFailed(f"an output of dtype {array.dtype} is not a tensor datatype")


def _binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in array.flat)
    return np.ascontiguousarray(array, dtype=BINARY[datatype]).tobytes()


def infer_response(model: str, version: str, request: dict[str, Any],
                   outputs: list[tuple[str, np.ndarray]]) -> Response:
    params = _parameters(request)
    binary_all = bool(params.get("binary_data_output"))
    wanted = request.get("outputs")
    binary: dict[str, bool] = {name: binary_all for name, _ in outputs}
    if wanted is not None:
        if not isinstance(wanted, list):
            raise ClientError("'outputs' must be a list of {name, parameters}", param="outputs")
        names = {name for name, _ in outputs}
        binary = {}
        for o in wanted:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in names:
                raise ClientError(f"unknown output {str(name)[:MAX_NAME_CHARS]!r}; this model "
                                  f"returns {sorted(names)}", param="outputs")
            binary[name] = bool(_parameters(o).get("binary_data", binary_all))
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in outputs:
        if name not in binary:
            continue
        datatype = _datatype(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary[name]:
            blob = _binary(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = [v.decode("utf-8", "replace") for v in array.flat] \
                if datatype == "BYTES" else array.reshape(-1).tolist()
        tensors.append(tensor)
    head = {"model_name": model, "model_version": version, "outputs": tensors}
    if isinstance(request.get("id"), str):
        head["id"] = request["id"][:MAX_NAME_CHARS]
    body = orjson.dumps(head)
    if not blobs:
        return Response(200, body)
    return Response(200, body + b"".join(blobs), b"application/octet-stream",
                    [(HEADER_LENGTH, str(len(body)).encode())])


def _parameters(obj: dict[str, Any]) -> dict[str, Any]:
    p = obj.get("parameters")
    return p if isinstance(p, dict) else {}


# --- routes ------------------------------------------------------------------------------------
def _model(gw: DataPlane, req: Request, params: dict[str, str]) -> Deployment:
    req.oip = True
    d = find_deployment(gw, params["model"])
    Access.allow_deployment(req, d.name)
    version = params.get("version")
    if version is not None and version not in (d.version, "1"):
        raise NotFound(f"model {d.name!r} serves version {d.version!r}, not {version[:64]!r}",
                       param="version")
    return d


async def server_metadata(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    req.oip = True
    return json_response({"name": "steadyserve", "version": __version__,
                          "extensions": ["binary_tensor_data"]})


async def live(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    req.oip = True
    return json_response({"live": True})


async def ready(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    req.oip = True
    ok, why = gw.membership.readiness()
    if gw.draining:
        ok, why = False, "draining"
    return json_response({"ready": ok, **({} if ok else {"error": why})}, 200 if ok else 503)


async def model_ready(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    d = _model(gw, req, params)
    ok = bool(d.endpoints) and not gw.draining
    return json_response({"name": d.name, "ready": ok}, 200 if ok else 503)


async def model_metadata(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    d = _model(gw, req, params)
    h = tensor_handler(d)
    specs = input_specs(h)
    outputs: list[dict[str, Any]] = []
    if h is d.openai_handler("embeddings"):
        outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]},
                   {"name": "tokens", "datatype": "INT64", "shape": [-1]}]
    return json_response({
        "name": d.name, "versions": [d.version or "1"], "platform": "steadyserve",
        "inputs": [{"name": s.name, "datatype": s.datatype, "shape": s.shape}
                   for s in specs or []],
        "outputs": outputs,
        "parameters": {"handler": h.name, "handlers": sorted(d.handlers),
                       **({} if specs is not None else {
                           "unsupported": "a parameter of this handler is not a tensor"})},
    })


async def infer(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    d = _model(gw, req, params)
    req.deployment = d.name
    body = await req.body(gw.config.max_body_bytes)
    if not body:
        raise ClientError("the inference request is empty; send JSON with 'inputs'")
    request, values = parse_infer(body, req.header(HEADER_LENGTH))
    await await_handlers(gw, req, d)
    chosen = _parameters(request).get("handler")
    h = tensor_handler(d, chosen if isinstance(chosen, str) else None)
    req.handler = h.name
    specs = input_specs(h)
    if specs is None:
        raise ClientError(f"handler {h.name!r} of model {d.name!r} takes a parameter that is "
                          "not a tensor; call it with the native API", param="handler")
    args = h.validate(to_args(h, specs, values))
    check_items(h, args, h.spec.options.max_inputs)
    result = await call(gw, req, d, h, args)
    return infer_response(d.name, d.version or "1", request,
                          output_tensors(result, h.spec.options.batch))

