"""Response compression: pick an encoding from Accept-Encoding (pure), then apply it.

Embeddings as JSON float text compress ~2×; tiny bodies are not worth the CPU, hence
`compress_min_bytes`. zstd is preferred over gzip at equal q: faster at a better ratio.
"""

from __future__ import annotations

import gzip
import threading

import zstandard

SUPPORTED = ("zstd", "gzip")
# one compressor per thread: a ZstdCompressor must not be used by two threads at once, and
# large responses are compressed in worker threads (Gateway._send)
_local = threading.local()


def choose_encoding(accept_encoding: str | None, body_len: int, min_bytes: int) -> str | None:
    """The encoding to use, or None for identity. Honours q-values and `*`."""
    if not accept_encoding or body_len < min_bytes:
        return None
    q: dict[str, float] = {}
    for part in accept_encoding.split(","):
        token, _, params = part.strip().partition(";")
        token = token.strip().lower()
        if not token:
            continue
        weight = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                weight = float(params[2:])
            except ValueError:
                weight = 0.0
        q[token] = weight
    best: str | None = None
    best_q = 0.0
    for name in SUPPORTED:
        weight = q.get(name, q.get("*", 0.0))
        if weight > best_q:
            best, best_q = name, weight
    return best


def compress(body: bytes, encoding: str) -> bytes:
    if encoding == "zstd":
        zstd: zstandard.ZstdCompressor | None = getattr(_local, "zstd", None)
        if zstd is None:
            zstd = _local.zstd = zstandard.ZstdCompressor(level=3)
        return zstd.compress(body)
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=5)
    raise ValueError(encoding)
