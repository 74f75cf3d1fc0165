"""Request bodies sent with a Content-Encoding (gzip, deflate, zstd): streaming decoders whose
output is bounded as it is produced, so a zip bomb is refused (413) before its memory is spent.

`decoder_for(header)` picks one (None for identity; 415 naming any other coding). A decoder's
`feed(chunk, room)` returns the decoded bytes of `chunk`, and at most `room + 1` of them: more
than `room` means over the limit, and decoding stops there. `finish()` refuses a body that ends
inside a compressed stream. Decoding runs on the event loop: the body limit (`max_body_bytes`,
1 MiB by default) keeps it to about a millisecond per request.
"""

from __future__ import annotations

import zlib
from typing import IO, Protocol, cast

import zstandard

from ..errors import ClientError, UnsupportedMediaType

SUPPORTED = ("gzip", "deflate", "zstd")
# zstd frames declare their window, and the decoder allocates it: a lying header could ask for
# 128 MiB (zstd's default cap). 8 MiB (window log 23) covers the zstd CLI's levels up to 19.
ZSTD_MAX_WINDOW = 1 << 23
_ZSTD_WRITE_SIZE = 64 * 1024  # decoded bytes per sink write: the overshoot past `room`


class Decoder(Protocol):
    def feed(self, chunk: bytes, room: int) -> bytes: ...
    def finish(self) -> None: ...


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """The decoder for a Content-Encoding header value; None for none or identity."""
    if content_encoding is None:
        return None
    coding = content_encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):  # x-gzip: RFC 9110 §8.4.1.3
        return ZlibDecoder(zlib.MAX_WBITS | 16, "gzip")
    if coding == "deflate":
        return ZlibDecoder(None, "deflate")
    if coding == "zstd":
        return ZstdDecoder()
    shown = content_encoding.strip()[:64]
    if "," in coding:
        raise UnsupportedMediaType(f"Content-Encoding {shown!r} stacks several codings; send the "
                                   f"body with one of {', '.join(SUPPORTED)} or none")
    raise UnsupportedMediaType(f"Content-Encoding {shown!r} is not supported; send the body with "
                               f"one of {', '.join(SUPPORTED)} or none")


class ZlibDecoder:
    """gzip (several members allowed, RFC 1952 §2.2) or deflate (zlib-wrapped as RFC 9110 says,
    or raw, which some clients send: told apart by the zlib header's checksum)."""

    def __init__(self, wbits: int | None, name: str) -> None:
        self._wbits = wbits
        self._name = name
        self._head = b""  # deflate: the first bytes, until the wrapping is known
        self._d: zlib._Decompress | None = None if wbits is None else zlib.decompressobj(wbits)

    def feed(self, chunk: bytes, room: int) -> bytes:
        if self._d is None:
            self._head += chunk
            if len(self._head) < 2:
                return b""
            b0, b1 = self._head[0], self._head[1]
            wbits = zlib.MAX_WBITS if b0 & 0x0F == 8 and (b0 << 8 | b1) % 31 == 0 \
                else -zlib.MAX_WBITS
            self._wbits = wbits
            self._d = zlib.decompressobj(wbits)
            chunk, self._head = self._head, b""
        out: list[bytes] = []
        try:
            while chunk:
                if self._d.eof:
                    if self._name != "gzip":
                        raise ClientError(f"data after the end of the {self._name} stream")
                    self._d = zlib.decompressobj(zlib.MAX_WBITS | 16)
                # max_length = room + 1: enough to tell "over the limit", never more
                piece = self._d.decompress(chunk, room + 1)
                out.append(piece)
                room -= len(piece)
                if room < 0:
                    break
                chunk = self._d.unused_data if self._d.eof else b""
        except zlib.error as exc:
            raise ClientError(f"invalid {self._name} request body: {exc}") from None
        return b"".join(out)

    def finish(self) -> None:
        if self._d is None or not self._d.eof:
            raise ClientError(f"the request body ends inside its {self._name} stream")


class _Full(Exception):
    pass


class _BoundedSink:
    """Where zstandard's stream writer puts decoded bytes; it stops the decoder past `room`."""

    def __init__(self) -> None:
        self.room = 0
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.room -= len(data)
        if self.room < 0:
            raise _Full
        return len(data)


class ZstdDecoder:
    """zstd through zstandard's stream writer, the one streaming API that bounds its output
    (its decompressobj returns whatever one chunk expands to, up to ~32,000×)."""

    def __init__(self) -> None:
        self._sink = _BoundedSink()
        self._writer = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
            cast("IO[bytes]", self._sink), write_size=_ZSTD_WRITE_SIZE, closefd=False)
        self._frames = ZstdFrames()

    def feed(self, chunk: bytes, room: int) -> bytes:
        self._sink.room, self._sink.parts = room, []
        self._frames.feed(chunk)
        try:
            self._writer.write(chunk)
        except _Full:
            pass  # over the limit: the caller sees more than `room` bytes
        except zstandard.ZstdError as exc:
            raise ClientError(f"invalid zstd request body: {exc}") from None
        return b"".join(self._sink.parts)

    def finish(self) -> None:
        if not self._frames.complete:
            raise ClientError("the request body ends inside its zstd stream")


class ZstdFrames:
    """Where a zstd stream stands, from its frame and block headers (RFC 8878 §3.1): the stream
    writer does not say whether its input ended inside a frame, so a truncated body would
    otherwise pass as a shorter one."""

    _MAGIC = 0xFD2FB528
    _SKIPPABLE = 0x184D2A50  # …through 0x184D2A5F

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4  # header bytes to collect for the state
        self._buf = bytearray()
        self._skip = 0  # payload bytes to pass over before the next header
        self._checksum = False
        self._frames = 0

    @property
    def complete(self) -> bool:
        """At least one whole frame, and nothing begun after it."""
        return self._state == "magic" and not self._buf and not self._skip and self._frames > 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self._state != "bad":
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            step = min(self._need - len(self._buf), n - i)
            self._buf += data[i:i + step]
            i += step
            if len(self._buf) == self._need:
                header = bytes(self._buf)
                self._buf.clear()
                self._step(int.from_bytes(header, "little"))

    def _step(self, value: int) -> None:
        if self._state == "magic":
            if value == self._MAGIC:
                self._state, self._need = "frame", 1
            elif value & 0xFFFFFFF0 == self._SKIPPABLE:
                self._state, self._need = "skippable", 4
            else:
                self._state = "bad"  # the decoder reports it
        elif self._state == "skippable":
            self._state, self._need, self._skip = "magic", 4, value
        elif self._state == "frame":  # Frame_Header_Descriptor
            single_segment = value >> 5 & 1
            self._checksum = bool(value >> 2 & 1)
            self._skip = (0 if single_segment else 1) + (0, 1, 2, 4)[value & 3] \
                + (single_segment, 2, 4, 8)[value >> 6]
            self._state, self._need = "block", 3
        else:  # a block header: last flag, type, size
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            self._skip = 1 if kind == 1 else size  # an RLE block carries one byte
            if last:
                self._skip += 4 if self._checksum else 0
                self._frames += 1
                self._state, self._need = "magic", 4
