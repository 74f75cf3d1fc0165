"""Small pure-ASGI helpers for the gateway: request context, bounded body reads, responses."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from ..errors import ClientError, PayloadTooLarge, SteadyError
from .decoding import decoder_for
from .dispatch import CallInfo

if TYPE_CHECKING:
    from ..auth.keys import ApiKey
    from .router import Route

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")
JSON = b"application/json"
# scope key the HTTP edge (gateway.edge) sets when it cut a request short (its body timed
# out): the app's receive() then says http.disconnect, and this says why
EDGE_ERROR = "steadyserve.edge_error"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is sane (≤128 safe chars), else a fresh one."""
    for key, value in headers:
        if key == b"x-request-id":
            if _REQUEST_ID.fullmatch(value):
                return value.decode()
            break
    return os.urandom(12).hex()


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    request_id: str
    deployment: str = "-"
    handler: str = "-"
    openai: bool = False
    oip: bool = False  # Open Inference Protocol: errors as {"error": "..."} (gateway.oip)
    call: CallInfo = field(default_factory=CallInfo)
    route: Route | None = None
    principal: ApiKey | None = None  # the API key that authenticated it, if any
    forwarded: bool = False  # a worker sent it to the gateway process (gateway.worker)
    child: bool = False  # a replica's call to another deployment (gateway.compose)
    caller: str | None = None  # a child call's: the deployment whose replica made it
    callees: frozenset[str] = frozenset()  # … and the deployments that one may call
    hops: int = 0  # how many calls deep it is (a client's request: 0)
    _headers: dict[bytes, bytes] | None = None  # first value of each name, built on first use

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    def header(self, name: bytes) -> str | None:
        """The first value of a header (names are lowercase, as ASGI gives them). A request
        is asked for a dozen of them along its path: one pass builds a table."""
        table = self._headers
        if table is None:
            table = {}
            for key, value in self.scope["headers"]:
                table.setdefault(key, value)
            self._headers = table
        value = table.get(name)
        return None if value is None else bytes(value).decode("latin-1")

    async def body(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes both as sent and once decoded (Content-Encoding
        gzip, deflate or zstd; any other coding is a 415 before a byte is read)."""
        decoder = decoder_for(self.header(b"content-encoding"))
        declared = self.header(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise PayloadTooLarge(f"request body of {declared} bytes is over the "
                                          f"limit of {limit} bytes")
            except ValueError:
                raise ClientError("invalid Content-Length header") from None
        chunks: list[bytes] = []
        received = size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                edge_error = self.scope.get(EDGE_ERROR)
                if isinstance(edge_error, SteadyError):
                    raise edge_error
                raise ClientError("client disconnected")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            if decoder is not None and chunk:
                chunk = decoder.feed(chunk, limit - size)
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body decodes to more than the limit of {limit} "
                                      "bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                if decoder is not None and received:
                    decoder.finish()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def query(self, name: str, max_chars: int) -> str | None:
        """A text query parameter (the last one given; UTF-8), None when absent; ClientError
        (400) naming it when longer than `max_chars` or not printable."""
        values = parse_qs(bytes(self.scope.get("query_string", b"")).decode("latin-1"),
                          keep_blank_values=True).get(name)
        if not values:
            return None
        raw = values[-1]  # percent-escapes decoded as UTF-8 (bad bytes replaced)
        if len(raw) > max_chars or not raw.isprintable():
            raise ClientError(f"'{name}' must be at most {max_chars} printable characters",
                              param=name)
        return raw

    def query_int(self, name: str, low: int, high: int, default: int) -> int:
        """A whole-number query parameter in [low, high] (the last one given), `default`
        when absent; ClientError (400) naming it otherwise. ASCII digits only, and short:
        str.isdigit() also accepts "²", and int() refuses over 4,300 digits."""
        raw = self.query(name, 64)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(high)) \
                or not low <= int(raw) <= high:
            raise ClientError(f"'{name}' must be a whole number from {low} to {high}",
                              param=name)
        return int(raw)

    async def json(self, limit: int) -> Any:
        raw = await self.body(limit)
        if not raw:
            raise ClientError("request body is empty; send a JSON object")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ClientError(f"invalid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # a streamed body (gateway.streaming): sent chunk by chunk after `body` is ignored
    stream: AsyncIterator[bytes] | None = None


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))
