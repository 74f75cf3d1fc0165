"""OpenAI-compatible routes: `POST /v1/embeddings` and `GET /v1/models`.

The deployment named by `model` must have a handler declared with `openai="embeddings"`
that returns, per input text, `{"embedding": float32 array, "tokens": int}`.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClientError, HandlerFailed, NotFound
from .access import Access
from .http import Request, Response, json_response
from .routes import await_handlers, call, check_items, find_deployment, find_handler

if TYPE_CHECKING:
    from .membership import Deployment, Handler
    from .plane import DataPlane

_STARTED = int(time.time())


async def models(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    req.openai = True
    return json_response({
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": _STARTED, "owned_by": "steadyserve"}
            for name in gw.membership.deployments
        ],
    })


def _inputs(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ClientError("'input' must be a string or a list of strings", param="input")
    if not value:
        raise ClientError("'input' must not be an empty list", param="input")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ClientError(
                f"'input[{i}]' must be a string (token arrays are not supported)", param="input"
            )
        if not text:
            raise ClientError(f"'input[{i}]' must not be an empty string", param="input")
    return value


async def model_of(gw: DataPlane, req: Request) -> tuple[dict[str, Any], str, Deployment]:
    """An OpenAI route's body, its `model` and that deployment (which the key may call)."""
    req.openai = True
    body = await req.json(gw.config.max_body_bytes)
    if not isinstance(body, dict):
        raise ClientError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ClientError("'model' is required and must be a string", param="model")
    d = find_deployment(gw, model)
    Access.allow_deployment(req, d.name)
    req.deployment = d.name
    return body, model, d


async def handler_of(gw: DataPlane, req: Request, d: Deployment, kind: str, what: str
                     ) -> Handler:
    """The deployment's `openai=kind` handler (waiting for a first replica if it scales from
    zero); 404 naming the model when it has none."""
    await await_handlers(gw, req, d)
    h = d.openai_handler(kind)
    if h is None:
        if not d.handlers:
            find_handler(d, "")  # raises the 503 "no ready replica yet"
        raise NotFound(f"model {d.name!r} does not serve {what}", param="model")
    req.handler = h.name
    return h


async def embeddings(gw: DataPlane, req: Request, params: dict[str, str]) -> Response:
    body, model, d = await model_of(gw, req)
    texts = _inputs(body.get("input"))
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64", None):
        raise ClientError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise ClientError("'dimensions' must be a positive integer", param="dimensions")
    h = await handler_of(gw, req, d, "embeddings", "embeddings")
    args = {h.item_param: texts}
    check_items(h, args, h.spec.options.max_inputs)
    results = await call(gw, req, d, h, args)
    data = []
    tokens = 0
    for i, r in enumerate(results):
        try:
            vector = np.asarray(r["embedding"], dtype=np.float32)
            tokens += int(r.get("tokens", 0))
        except (TypeError, KeyError, ValueError) as exc:
            raise HandlerFailed(f"embedding handler returned a malformed item: {exc}") from exc
        if dimensions is not None and dimensions != vector.shape[-1]:
            raise ClientError(f"model {model!r} has {vector.shape[-1]} dimensions; "
                              f"'dimensions'={dimensions} is not supported", param="dimensions")
        embedding: Any = (
            base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode()
            if fmt == "base64" else vector
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json_response({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
