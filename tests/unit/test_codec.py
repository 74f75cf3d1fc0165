"""codec.py: msgpack wire encoding with numpy arrays as raw bytes."""

from __future__ import annotations

import datetime
import decimal

import numpy as np
import pytest

from steadyserve import codec


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param({"a": 1, "b": [1, 2, {"c": None}], "d": {"e": "é", "f": True}}, id="nested-dict"),
        pytest.param({"bytes": b"\x00\xff", "float": 1.5, "neg": -7}, id="bytes-and-numbers"),
        pytest.param({1: "int-key", "s": "str-key"}, id="int-keys"),
        pytest.param([], id="empty-list"),
        pytest.param({}, id="empty-dict"),
        pytest.param("just a string", id="str"),
        pytest.param(None, id="none"),
        pytest.param(2**63 - 1, id="max-int64"),
    ],
)
def test_round_trip_plain(obj):
    assert codec.decode(codec.encode(obj)) == obj


def test_tuples_come_back_as_lists():
    assert codec.decode(codec.encode({"t": (1, 2)})) == {"t": [1, 2]}


@pytest.mark.parametrize(
    "arr",
    [
        pytest.param(np.arange(384, dtype=np.float32) / 7, id="float32-1d-embedding"),
        pytest.param(np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5, id="float32-2d"),
        pytest.param(np.arange(6, dtype=np.float64).reshape(2, 3), id="float64-2d"),
        pytest.param(np.array([1, -2, 3], dtype=np.int64), id="int64"),
        pytest.param(np.array([True, False]), id="bool"),
        pytest.param(np.array([1.0, 2.0], dtype=">f4"), id="big-endian-float32"),
        pytest.param(np.zeros(0, dtype=np.float32), id="empty"),
        pytest.param(np.zeros((2, 0), dtype=np.float32), id="empty-2d"),
        pytest.param(np.arange(24, dtype=np.float32).reshape(2, 3, 4), id="3d"),
        pytest.param(np.arange(12, dtype=np.float32).reshape(3, 4).T, id="transposed-non-contiguous"),
        pytest.param(np.arange(10, dtype=np.float32)[::3], id="strided-non-contiguous"),
    ],
)
def test_ndarray_round_trip_keeps_dtype_shape_values(arr):
    out = codec.decode(codec.encode(arr))
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_ndarray_inside_nested_structure():
    emb = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    out = codec.decode(codec.encode({"data": [{"embedding": emb, "index": 0}], "model": "m"}))
    assert out["model"] == "m"
    assert out["data"][0]["index"] == 0
    got = out["data"][0]["embedding"]
    assert got.dtype == np.float32
    assert got.shape == (2, 4)
    np.testing.assert_array_equal(got, emb)


def test_float32_array_travels_as_raw_bytes():
    arr = np.zeros(384, dtype=np.float32)
    # 384 × 4 bytes plus a small header, far below JSON float text
    assert 384 * 4 < len(codec.encode(arr)) < 384 * 4 + 32


@pytest.mark.parametrize(
    ("value", "expected", "py_type"),
    [
        pytest.param(np.float32(1.5), 1.5, float, id="float32"),
        pytest.param(np.float64(2.25), 2.25, float, id="float64"),
        pytest.param(np.int64(7), 7, int, id="int64"),
        pytest.param(np.int32(-3), -3, int, id="int32"),
        pytest.param(np.uint8(255), 255, int, id="uint8"),
        pytest.param(np.bool_(True), True, bool, id="bool"),
    ],
)
def test_numpy_scalars_become_python_numbers(value, expected, py_type):
    out = codec.decode(codec.encode({"v": value}))["v"]
    assert type(out) is py_type
    assert out == expected


class TensorLike:
    """Stands in for a torch tensor: has tolist and converts with np.asarray."""

    def __init__(self, data: list[list[float]]) -> None:
        self.data = data

    def tolist(self) -> list[list[float]]:
        return self.data

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.data, dtype=np.float32)


def test_tensor_like_objects_encode_as_arrays():
    out = codec.decode(codec.encode(TensorLike([[1.0, 2.0], [3.0, 4.0]])))
    assert out.dtype == np.float32
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out, [[1.0, 2.0], [3.0, 4.0]])


class Opaque:
    pass


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(Opaque(), id="plain-object"),
        pytest.param({1, 2}, id="set"),
        pytest.param(datetime.datetime(2024, 1, 1), id="datetime"),
        pytest.param(decimal.Decimal("1.5"), id="decimal"),
        pytest.param({"nested": [Opaque()]}, id="nested-object"),
    ],
)
def test_unknown_objects_raise_type_error(obj):
    with pytest.raises(TypeError):
        codec.encode(obj)


def test_unknown_object_error_names_the_type():
    with pytest.raises(TypeError, match="Opaque"):
        codec.encode(Opaque())


def test_unknown_ext_types_pass_through():
    import msgpack

    data = msgpack.packb(msgpack.ExtType(42, b"abc"))
    assert codec.decode(data) == msgpack.ExtType(42, b"abc")


@pytest.mark.parametrize(
    "arr",
    [
        pytest.param(np.array(3.0, dtype=np.float32), id="0d-ndarray"),
        pytest.param(TensorLike(2.5), id="0d-tensor-like"),  # type: ignore[arg-type]
    ],
)
def test_zero_dim_array_keeps_its_shape(arr):
    out = codec.decode(codec.encode(arr))
    assert np.shape(out) == ()
    assert float(out) == float(np.asarray(arr))


def test_object_dtype_array_is_refused_at_encode():
    with pytest.raises(TypeError):
        codec.encode(np.array([{"a": 1}, None], dtype=object))
