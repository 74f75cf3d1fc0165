"""gateway.oip without a server: tensors in (JSON and the binary data extension, hostile
bodies refused with the reason), arguments for a handler, outputs stacked into tensors."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from steadyserve.errors import ClientError, HandlerFailed
from steadyserve.gateway.membership import Handler
from steadyserve.gateway.oip import infer_response, input_specs, output_tensors, parse_infer, to_args
from steadyserve.schema import compile_params
from steadyserve.service import HandlerOptions, HandlerSpec

TX = {"kind": "object", "name": "Transaction", "required": ["account_id", "amount"],
      "fields": {"account_id": {"kind": "int"}, "amount": {"kind": "float"},
                 "note": {"kind": "str"}}}


def handler(params: list[dict], batch: bool) -> Handler:
    spec = HandlerSpec("h", HandlerOptions(batch=batch, max_batch_size=8), params)
    return Handler(spec, compile_params(params))


BATCHED_OBJECTS = handler([{"name": "txs", "type": {"kind": "list", "item": TX},
                            "required": True}], batch=True)
BATCHED_TEXTS = handler([{"name": "texts", "type": {"kind": "list", "item": {"kind": "str"}},
                          "required": True}], batch=True)
PLAIN = handler([{"name": "x", "type": {"kind": "float"}, "required": True},
                 {"name": "flag", "type": {"kind": "bool"}, "required": False},
                 {"name": "xs", "type": {"kind": "list", "item": {"kind": "int"}},
                  "required": False}], batch=False)
NOT_A_TENSOR = handler([{"name": "blob", "type": {"kind": "dict"}, "required": True}],
                       batch=False)


def body(*inputs: dict, **extra) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def binary_bytes(*items: bytes) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def test_specs_follow_the_handler() -> None:
    assert [(s.name, s.datatype, s.shape) for s in input_specs(BATCHED_OBJECTS)] == [
        ("account_id", "INT64", [-1]), ("amount", "FP32", [-1]), ("note", "BYTES", [-1])]
    assert [(s.name, s.datatype) for s in input_specs(BATCHED_TEXTS)] == [("texts", "BYTES")]
    assert [(s.name, s.shape) for s in input_specs(PLAIN)] == [("x", [1]), ("flag", [1]),
                                                                ("xs", [-1])]
    assert input_specs(NOT_A_TENSOR) is None


def test_json_and_binary_inputs_make_the_same_arguments() -> None:
    as_json = body({"name": "account_id", "shape": [2], "datatype": "INT64", "data": [1, 2]},
                   {"name": "amount", "shape": [2, 1], "datatype": "FP64", "data": [[1.5], [2]]},
                   {"name": "note", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]})
    head = body({"name": "account_id", "shape": [2], "datatype": "INT64",
                 "parameters": {"binary_data_size": 16}},
                {"name": "amount", "shape": [2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 8}},
                {"name": "note", "shape": [2], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 10}})
    blob = np.array([1, 2], "<i8").tobytes() + np.array([1.5, 2], "<f4").tobytes() + \
        binary_bytes(b"a", b"b")
    specs = input_specs(BATCHED_OBJECTS)
    want = {"txs": [{"account_id": 1, "amount": 1.5, "note": "a"},
                    {"account_id": 2, "amount": 2.0, "note": "b"}]}
    for raw, length in ((as_json, None), (head + blob, str(len(head)))):
        _, values = parse_infer(raw, length)
        assert to_args(BATCHED_OBJECTS, specs, values) == want


@pytest.mark.parametrize(("raw", "length", "says"), [
    (b"[]", None, "JSON object"),
    (b"{", None, "invalid JSON"),
    (body(), None, "non-empty list"),
    (body({"name": "x", "shape": [1], "datatype": "FP32"}), None, "'data' (a list)"),
    (body({"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}), None, "non-negative"),
    (body({"name": "x", "shape": [1] * 9, "datatype": "FP32", "data": [1]}), None, "at most 8"),
    (body({"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}), None, "holds 2"),
    (body({"name": "x", "shape": [], "datatype": {}, "data": [None]}), None, "unknown datatype"),
    (body({"name": "x", "shape": [], "datatype": ["FP32"], "data": [1]}), None,
     "unknown datatype"),
    (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
          {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}), None, "given twice"),
    (body({"name": "", "shape": [1], "datatype": "FP32", "data": [1]}), None, "'name'"),
    (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, id=5), None,
     "'id' must be a string"),
    (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}, outputs="all"), None,
     "'outputs' must be a list"),
    (body({"name": "x", "shape": [1], "datatype": "FP32",
           "parameters": {"binary_data_size": 4}}), "7", "outside the binary part"),
    (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}), "0", "outside the body"),
    (body({"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}), "lots", "whole number"),
])
def test_hostile_requests_are_refused_with_the_reason(raw: bytes, length: str | None,
                                                      says: str) -> None:
    if length == "7":  # a header length that leaves 3 bytes for a 4-byte FP32
        length = str(len(raw))
        raw += b"\x00\x00\x00"
    with pytest.raises(ClientError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_infer(raw, length)


@pytest.mark.parametrize(("blob", "says"), [
    (b"\x05\x00\x00", "length is cut off"),
    (b"\x05\x00\x00\x00ab", "runs past its data"),
    (binary_bytes(b"ok") + b"!", "belong to no input"),
])
def test_broken_binary_bytes_are_refused(blob: bytes, says: str) -> None:
    head = body({"name": "texts", "shape": [1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": len(blob) - (1 if says.startswith("bel")
                                                                 else 0)}})
    with pytest.raises(ClientError, match=says):
        parse_infer(head + blob, str(len(head)))


@pytest.mark.parametrize(("inputs", "says"), [
    ([{"name": "amount", "shape": [1], "datatype": "FP32", "data": [1]}], "'account_id' is required"),
    ([{"name": "account_id", "shape": [1], "datatype": "FP32", "data": [1.5]},
      {"name": "amount", "shape": [1], "datatype": "FP32", "data": [1]}], "not a whole number"),
    ([{"name": "account_id", "shape": [2], "datatype": "INT64", "data": [1, 2]},
      {"name": "amount", "shape": [1], "datatype": "FP32", "data": [1]}], "same number"),
    ([{"name": "account_id", "shape": [1], "datatype": "BYTES", "data": ["1"]},
      {"name": "amount", "shape": [1], "datatype": "FP32", "data": [1]}], "expected a number"),
    ([{"name": "account_id", "shape": [1], "datatype": "INT64", "data": [1]},
      {"name": "amount", "shape": [1], "datatype": "FP32", "data": [1]},
      {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}], "unknown input 'extra'"),
])
def test_inputs_that_do_not_fit_the_handler(inputs: list[dict], says: str) -> None:
    _, values = parse_infer(body(*inputs), None)
    with pytest.raises(ClientError, match=says):
        to_args(BATCHED_OBJECTS, input_specs(BATCHED_OBJECTS), values)


def test_a_plain_handler_takes_scalars_and_lists() -> None:
    _, values = parse_infer(body({"name": "x", "shape": [1], "datatype": "FP64", "data": [2]},
                                 {"name": "flag", "shape": [1], "datatype": "BOOL",
                                  "data": [True]},
                                 {"name": "xs", "shape": [3], "datatype": "INT32",
                                  "data": [1, 2, 3]}), None)
    assert to_args(PLAIN, input_specs(PLAIN), values) == {"x": 2.0, "flag": True,
                                                         "xs": [1, 2, 3]}
    _, two = parse_infer(body({"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]}),
                         None)
    with pytest.raises(ClientError, match="takes one element"):
        to_args(PLAIN, input_specs(PLAIN), two)


def test_outputs_are_stacked_and_what_is_not_a_tensor_travels_as_json() -> None:
    items = [{"embedding": np.ones(3, np.float32), "tokens": 4, "score": 0.5, "ok": True,
              "label": "fraud", "top": [["amount", 0.3]]},
             {"embedding": np.zeros(3, np.float32), "tokens": 2, "score": 1.0, "ok": False,
              "label": "ok", "top": []}]
    out = dict(output_tensors(items, batched=True))
    assert out["embedding"].shape == (2, 3) and out["embedding"].dtype == np.float32
    assert out["tokens"].tolist() == [4, 2] and out["ok"].tolist() == [True, False]
    assert out["score"].dtype == np.float64
    assert out["label"].tolist() == [b"fraud", b"ok"]
    assert [orjson.loads(v) for v in out["top"]] == [[["amount", 0.3]], []]
    with pytest.raises(HandlerFailed, match="same fields"):
        output_tensors([{"a": 1}, {"b": 1}], batched=True)


def test_a_binary_response_has_its_header_length() -> None:
    outputs = output_tensors([{"v": np.array([1.0, 2.0], np.float32), "s": "x"}], batched=True)
    resp = infer_response("m", "1", {"id": "r", "parameters": {"binary_data_output": True}},
                          outputs)
    n = int(dict(resp.headers)[b"inference-header-content-length"])
    head = orjson.loads(resp.body[:n])
    assert head["id"] == "r" and [t["parameters"]["binary_data_size"] for t in
                                  head["outputs"]] == [8, 5]
    assert resp.body[n:] == np.array([1, 2], "<f4").tobytes() + b"\x01\x00\x00\x00x"
    plain = infer_response("m", "1", {"outputs": [{"name": "s"}]}, outputs)
    assert orjson.loads(plain.body)["outputs"] == [{"name": "s", "datatype": "BYTES",
                                                    "shape": [1], "data": ["x"]}]
