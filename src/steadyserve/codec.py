"""The gateway ↔ replica wire encoding: msgpack, with numpy arrays as raw bytes.

An embedding travels as 384 × 4 bytes of float32 instead of ~3.5 kB of JSON float text; the
gateway turns it into JSON (orjson, straight from the buffer) or base64 only at the edge.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_NDARRAY = 1
CONTENT_TYPE = b"application/msgpack"


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("cannot encode an object-dtype array for the wire; convert it first")
        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        header = msgpack.packb([arr.dtype.str, list(obj.shape)])
        return msgpack.ExtType(_NDARRAY, header + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist"):  # torch tensors and the like, without importing torch here
        return _default(np.asarray(obj))
    raise TypeError(f"cannot encode {type(obj).__name__} for the wire")


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _NDARRAY:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        dtype, shape = unpacker.unpack()
        offset = unpacker.tell()
        return np.frombuffer(data, dtype=np.dtype(dtype), offset=offset).reshape(shape)
    return msgpack.ExtType(code, data)


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
