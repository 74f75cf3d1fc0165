"""schema.py: type descriptions from hints and the compiled request validators."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, NotRequired, Optional, Required, TypedDict, Union

import orjson
import pytest
import typing_extensions as te

from steadyserve.errors import ClientError, ConfigError
from steadyserve.schema import compile_params, compile_type, describe_params, describe_type, type_name
from steadyserve.service import HandlerSpec, Service, handler, handler_specs

STR = {"kind": "str"}
INT = {"kind": "int"}
FLOAT = {"kind": "float"}
BOOL = {"kind": "bool"}
ANY = {"kind": "any"}


@pytest.mark.parametrize(
    ("tp", "desc"),
    [
        pytest.param(str, STR, id="str"),
        pytest.param(int, INT, id="int"),
        pytest.param(float, FLOAT, id="float"),
        pytest.param(bool, BOOL, id="bool"),
        pytest.param(bytes, {"kind": "bytes"}, id="bytes"),
        pytest.param(list[str], {"kind": "list", "item": STR}, id="list[str]"),
        pytest.param(list[list[float]], {"kind": "list", "item": {"kind": "list", "item": FLOAT}},
                     id="list[list[float]]"),
        pytest.param(list, {"kind": "list", "item": ANY}, id="bare-list"),
        pytest.param(tuple[int, ...], {"kind": "list", "item": INT}, id="tuple[int,...]"),
        pytest.param(dict, {"kind": "dict"}, id="bare-dict"),
        pytest.param(dict[str, int], {"kind": "dict"}, id="dict[str,int]"),
        pytest.param(Optional[int], {"kind": "optional", "item": INT}, id="Optional[int]"),  # noqa: UP045
        pytest.param(int | None, {"kind": "optional", "item": INT}, id="int|None"),
        pytest.param(None | list[str], {"kind": "optional", "item": {"kind": "list", "item": STR}},
                     id="None|list[str]"),
        pytest.param(Union[int, str], ANY, id="Union[int,str]-is-any"),  # noqa: UP007
        pytest.param(Any, ANY, id="Any"),
        pytest.param(object, ANY, id="object"),
        pytest.param(inspect.Parameter.empty, ANY, id="no-annotation"),
    ],
)
def test_describe_type(tp, desc):
    assert describe_type(tp) == desc


class Custom:
    pass


@pytest.mark.parametrize(
    "tp",
    [
        pytest.param(set[int], id="set[int]"),
        pytest.param(Custom, id="custom-class"),
        pytest.param(complex, id="complex"),
        pytest.param(list[set[int]], id="list-of-unsupported"),
        pytest.param(Optional[Custom], id="optional-of-unsupported"),  # noqa: UP045
    ],
)
def test_describe_type_unsupported_raises_config_error(tp):
    with pytest.raises(ConfigError, match="unsupported parameter type"):
        describe_type(tp)


@pytest.mark.parametrize(
    ("desc", "name"),
    [
        pytest.param(STR, "str", id="str"),
        pytest.param({"kind": "list", "item": STR}, "list[str]", id="list"),
        pytest.param({"kind": "optional", "item": INT}, "int | null", id="optional"),
        pytest.param({"kind": "list", "item": {"kind": "optional", "item": FLOAT}}, "list[float | null]",
                     id="list-of-optional"),
    ],
)
def test_type_name(desc, name):
    assert type_name(desc) == name


# --- describe_params --------------------------------------------------------------------------

class Handlers:
    def echo(self, text: str, times: int = 1) -> str:
        return text * times

    def untyped(self, x, y=2):
        return x

    def star(self, *texts: str) -> None: ...

    def kw(self, **kw: Any) -> None: ...


def test_describe_params_skips_self_and_marks_required():
    assert describe_params(Handlers.echo) == [
        {"name": "text", "type": STR, "required": True},
        {"name": "times", "type": INT, "required": False},
    ]


def test_describe_params_without_hints_is_any():
    assert describe_params(Handlers.untyped) == [
        {"name": "x", "type": ANY, "required": True},
        {"name": "y", "type": ANY, "required": False},
    ]


def test_describe_params_skip_self_false_keeps_first():
    def f(a: int) -> None: ...
    assert describe_params(f, skip_self=False) == [{"name": "a", "type": INT, "required": True}]


@pytest.mark.parametrize("fn", [Handlers.star, Handlers.kw], ids=["*args", "**kwargs"])
def test_describe_params_refuses_var_args(fn):
    with pytest.raises(ConfigError, match=r"\*args/\*\*kwargs"):
        describe_params(fn)


# --- compile_params: accepted bodies ----------------------------------------------------------

def p(name: str, desc: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"name": name, "type": desc, "required": required}


LIST_STR = {"kind": "list", "item": STR}
LIST_ANY = {"kind": "list", "item": ANY}


@pytest.mark.parametrize(
    ("params", "body", "out"),
    [
        pytest.param([p("text", STR)], {"text": "hi"}, {"text": "hi"}, id="str"),
        pytest.param([p("n", INT)], {"n": 3}, {"n": 3}, id="int"),
        pytest.param([p("n", INT)], {"n": -(2**70)}, {"n": -(2**70)}, id="big-int"),
        pytest.param([p("x", FLOAT)], {"x": 0.5}, {"x": 0.5}, id="float"),
        pytest.param([p("b", BOOL)], {"b": False}, {"b": False}, id="bool"),
        pytest.param([p("d", {"kind": "dict"})], {"d": {"a": 1}}, {"d": {"a": 1}}, id="dict"),
        pytest.param([p("a", ANY)], {"a": [1, "x", None]}, {"a": [1, "x", None]}, id="any"),
        pytest.param([p("texts", LIST_STR)], {"texts": ["a", "b"]}, {"texts": ["a", "b"]}, id="list[str]"),
        pytest.param([p("texts", LIST_STR)], {"texts": []}, {"texts": []}, id="empty-list"),
        pytest.param([p("xs", LIST_ANY)], {"xs": [1, "a"]}, {"xs": [1, "a"]}, id="list[any]"),
        pytest.param([p("n", {"kind": "optional", "item": INT})], {"n": None}, {"n": None},
                     id="optional-null"),
        pytest.param([p("n", {"kind": "optional", "item": INT})], {"n": 4}, {"n": 4}, id="optional-value"),
        pytest.param([p("text", STR), p("n", INT, required=False)], {"text": "a"}, {"text": "a"},
                     id="optional-field-absent-not-filled"),
        pytest.param([], {}, {}, id="no-params-empty-body"),
    ],
)
def test_compile_params_accepts(params, body, out):
    assert compile_params(params)(body) == out


@pytest.mark.parametrize(
    ("desc", "value", "expected"),
    [
        pytest.param(FLOAT, 3, 3.0, id="float-from-int"),
        pytest.param({"kind": "list", "item": FLOAT}, [1, 2.5], [1.0, 2.5], id="list-float-from-ints"),
        pytest.param({"kind": "optional", "item": FLOAT}, 2, 2.0, id="optional-float-from-int"),
    ],
)
def test_int_is_converted_for_float(desc, value, expected):
    out = compile_params([p("x", desc)])({"x": value})["x"]
    assert out == expected
    items = out if isinstance(out, list) else [out]
    assert all(type(v) is float for v in items)


# --- compile_params: refused bodies -----------------------------------------------------------

@pytest.mark.parametrize(
    ("params", "body", "message", "param"),
    [
        pytest.param([p("text", STR)], {}, "missing required field 'text'", "text", id="missing-required"),
        pytest.param([p("text", STR)], {"text": "a", "txt": "b"}, "unknown field 'txt'", "txt",
                     id="unknown-field"),
        pytest.param([p("a", STR, False)], {"zz": 1, "bb": 2}, "unknown field 'bb'", "bb",
                     id="first-unknown-alphabetically"),
        pytest.param([p("text", STR)], {"text": 1}, "'text' must be str, got int", "text", id="int-for-str"),
        pytest.param([p("text", STR)], {"text": None}, "'text' must be str, got null", "text",
                     id="null-for-str"),
        pytest.param([p("n", INT)], {"n": True}, "'n' must be int, got bool", "n", id="bool-for-int"),
        pytest.param([p("n", INT)], {"n": 1.0}, "'n' must be int, got float", "n", id="float-for-int"),
        pytest.param([p("n", INT)], {"n": "1"}, "'n' must be int, got str", "n", id="str-for-int"),
        pytest.param([p("x", FLOAT)], {"x": True}, "'x' must be float, got bool", "x", id="bool-for-float"),
        pytest.param([p("x", FLOAT)], {"x": "1.5"}, "'x' must be float, got str", "x", id="str-for-float"),
        pytest.param([p("b", BOOL)], {"b": 1}, "'b' must be bool, got int", "b", id="int-for-bool"),
        pytest.param([p("d", {"kind": "dict"})], {"d": []}, "'d' must be dict, got list", "d",
                     id="list-for-dict"),
        pytest.param([p("texts", LIST_STR)], {"texts": "abc"}, "'texts' must be list[str], got str",
                     "texts", id="str-for-list"),
        pytest.param([p("texts", LIST_STR)], {"texts": ["a", 2]}, "'texts[1]' must be str, got int",
                     "texts[1]", id="list-item-index"),
        pytest.param([p("xs", {"kind": "list", "item": {"kind": "list", "item": INT}})],
                     {"xs": [[1], [2, "3"]]}, "'xs[1][1]' must be int, got str", "xs[1][1]",
                     id="nested-list-item-index"),
        pytest.param([p("n", {"kind": "optional", "item": INT})], {"n": "x"},
                     "'n' must be int, got str", "n", id="optional-wrong-inner"),
        pytest.param([p("xs", {"kind": "list", "item": {"kind": "optional", "item": INT}})],
                     {"xs": [None, 1.5]}, "'xs[1]' must be int, got float", "xs[1]",
                     id="list-of-optional-item"),
    ],
)
def test_compile_params_refuses(params, body, message, param):
    with pytest.raises(ClientError) as info:
        compile_params(params)(body)
    assert info.value.message == message
    assert info.value.param == param
    assert info.value.status == 400


@pytest.mark.parametrize("body", [None, [], ["text"], "text", 3, b"{}"],
                         ids=["null", "empty-list", "list", "str", "int", "bytes"])
def test_non_object_body_refused(body):
    with pytest.raises(ClientError, match="must be a JSON object") as info:
        compile_params([p("text", STR)])(body)
    assert info.value.param is None


def test_required_check_runs_in_param_order():
    validate = compile_params([p("b", STR), p("a", STR)])
    with pytest.raises(ClientError, match="'b'"):
        validate({})


def test_unknown_type_kind_refused_when_compiling():
    with pytest.raises(ConfigError, match="unknown type kind 'tensor'"):
        compile_type({"kind": "tensor"})


def test_describe_then_compile_round_trip():
    def handler(self, texts: list[str], normalize: bool = True, top_k: int | None = None) -> None: ...
    validate = compile_params(describe_params(handler))
    assert validate({"texts": ["a"], "top_k": None}) == {"texts": ["a"], "top_k": None}
    with pytest.raises(ClientError, match=r"'texts\[0\]' must be str, got int"):
        validate({"texts": [0]})
    with pytest.raises(ClientError, match="'normalize' must be bool, got str"):
        validate({"texts": [], "normalize": "yes"})


# --- TypedDict items (kind "object") ----------------------------------------------------------
# This module has `from __future__ import annotations`, so the class-syntax TypedDicts below
# also cover Python 3.11 listing a string-annotated NotRequired key in __required_keys__.

class Txn(TypedDict):
    account_id: int
    amount: float
    merchant_category: str
    hour: NotRequired[int]


class Partial(TypedDict, total=False):
    key: Required[str]
    note: str | None


class Derived(Partial):  # total=True again: its own fields are required, Partial's keep theirs
    extra: int


class Outer(TypedDict):
    txns: list[Txn]
    meta: NotRequired[Partial]


class Labelled(TypedDict):
    score: Annotated[float, "0..1"]
    tag: NotRequired[Annotated[str, "free text"]]


class ExtReadOnly(te.TypedDict):
    ro: te.ReadOnly[int]
    maybe: te.NotRequired[te.ReadOnly[str]]


class Node(TypedDict):
    children: list[Node]


class BadField(TypedDict):
    tags: set[str]


# functional syntax: real types, not strings, at class creation
Functional = TypedDict("Functional", {"a": int, "b": NotRequired[list[float]]})  # noqa: UP013

TXN = {"kind": "object", "name": "Txn",
       "fields": {"account_id": INT, "amount": FLOAT, "merchant_category": STR, "hour": INT},
       "required": ["account_id", "amount", "merchant_category"]}
PARTIAL = {"kind": "object", "name": "Partial",
           "fields": {"key": STR, "note": {"kind": "optional", "item": STR}}, "required": ["key"]}


@pytest.mark.parametrize(
    ("tp", "desc"),
    [
        pytest.param(Txn, TXN, id="total-with-NotRequired"),
        pytest.param(Partial, PARTIAL, id="total=False-with-Required"),
        pytest.param(Derived, {**PARTIAL, "name": "Derived",
                               "fields": {**PARTIAL["fields"], "extra": INT},
                               "required": ["key", "extra"]}, id="inherited-mixed-totality"),
        pytest.param(Outer, {"kind": "object", "name": "Outer",
                             "fields": {"txns": {"kind": "list", "item": TXN}, "meta": PARTIAL},
                             "required": ["txns"]}, id="nested-objects"),
        pytest.param(list[Txn], {"kind": "list", "item": TXN}, id="list[TypedDict]"),
        pytest.param(Txn | None, {"kind": "optional", "item": TXN}, id="optional-TypedDict"),
        pytest.param(Labelled, {"kind": "object", "name": "Labelled", "fields": {"score": FLOAT, "tag": STR},
                                "required": ["score"]}, id="Annotated-fields"),
        pytest.param(ExtReadOnly, {"kind": "object", "name": "ExtReadOnly",
                                   "fields": {"ro": INT, "maybe": STR}, "required": ["ro"]},
                     id="typing_extensions-ReadOnly"),
        pytest.param(Functional, {"kind": "object", "name": "Functional",
                                  "fields": {"a": INT, "b": {"kind": "list", "item": FLOAT}},
                                  "required": ["a"]}, id="functional-syntax"),
    ],
)
def test_describe_typeddict(tp, desc):
    assert describe_type(tp) == desc
    assert orjson.loads(orjson.dumps(describe_type(tp))) == desc  # travels to the gateway as JSON


@pytest.mark.parametrize(
    ("tp", "match"),
    [
        pytest.param(Node, "may not contain itself", id="recursive"),
        pytest.param(BadField, "unsupported parameter type", id="unsupported-field"),
        pytest.param(list[BadField], "unsupported parameter type", id="list-of-bad"),
    ],
)
def test_describe_typeddict_refused(tp, match):
    with pytest.raises(ConfigError, match=match):
        describe_type(tp)


def test_type_name_of_object():
    assert type_name({"kind": "list", "item": TXN}) == "list[object Txn]"


TXNS = [p("transactions", {"kind": "list", "item": TXN})]
GOOD = {"account_id": 7, "amount": 12.5, "merchant_category": "grocery", "hour": 3}


@pytest.mark.parametrize(
    ("params", "body", "out"),
    [
        pytest.param(TXNS, {"transactions": [GOOD]}, {"transactions": [GOOD]}, id="full-item"),
        pytest.param(TXNS, {"transactions": [{**GOOD, "amount": 12}]},
                     {"transactions": [{**GOOD, "amount": 12.0}]}, id="int-amount-becomes-float"),
        pytest.param(TXNS, {"transactions": [{k: v for k, v in GOOD.items() if k != "hour"}]},
                     {"transactions": [{k: v for k, v in GOOD.items() if k != "hour"}]},
                     id="not-required-absent"),
        pytest.param(TXNS, {"transactions": []}, {"transactions": []}, id="no-items"),
        pytest.param([p("item", PARTIAL)], {"item": {"key": "k", "note": None}},
                     {"item": {"key": "k", "note": None}}, id="optional-null-field"),
        pytest.param([p("o", describe_type(Outer))], {"o": {"txns": [GOOD], "meta": {"key": "x"}}},
                     {"o": {"txns": [GOOD], "meta": {"key": "x"}}}, id="nested"),
        pytest.param([p("item", {"kind": "optional", "item": PARTIAL})], {"item": None}, {"item": None},
                     id="optional-object-null"),
    ],
)
def test_compile_object_accepts(params, body, out):
    got = compile_params(params)(body)
    assert got == out
    if params is TXNS and got["transactions"]:
        assert type(got["transactions"][0]["amount"]) is float


def _txn(i: int, **change: Any) -> list[dict[str, Any]]:
    """Three good items, then item `i` changed (a None value deletes the field)."""
    items = [dict(GOOD) for _ in range(max(3, i + 1))]
    for k, v in change.items():
        if v is None:
            del items[i][k]
        else:
            items[i][k] = v
    return items


@pytest.mark.parametrize(
    ("params", "body", "message", "param"),
    [
        pytest.param(TXNS, {"transactions": _txn(3, amount="12")},
                     "'transactions[3].amount' must be float, got str", "transactions[3].amount",
                     id="str-for-float"),
        pytest.param(TXNS, {"transactions": _txn(0, account_id=1.0)},
                     "'transactions[0].account_id' must be int, got float", "transactions[0].account_id",
                     id="float-for-int"),
        pytest.param(TXNS, {"transactions": _txn(1, hour=True)},
                     "'transactions[1].hour' must be int, got bool", "transactions[1].hour",
                     id="bool-for-int"),
        pytest.param(TXNS, {"transactions": _txn(2, merchant_category=None)},
                     "missing required field 'transactions[2].merchant_category'",
                     "transactions[2].merchant_category", id="missing-required"),
        pytest.param(TXNS, {"transactions": _txn(1, currency="EUR", city="Oslo")},
                     "unknown field 'transactions[1].city'", "transactions[1].city", id="unknown-field"),
        pytest.param(TXNS, {"transactions": [GOOD, "x"]},
                     "'transactions[1]' must be object Txn, got str", "transactions[1]", id="str-for-object"),
        pytest.param(TXNS, {"transactions": [None]},
                     "'transactions[0]' must be object Txn, got null", "transactions[0]",
                     id="null-for-object"),
        pytest.param(TXNS, {"transactions": GOOD},
                     "'transactions' must be list[object Txn], got dict", "transactions",
                     id="object-for-list"),
        pytest.param([p("item", PARTIAL)], {"item": {"note": "n"}},
                     "missing required field 'item.key'", "item.key", id="Required-in-total-False"),
        pytest.param([p("o", describe_type(Outer))], {"o": {"txns": [GOOD], "meta": {"key": 1}}},
                     "'o.meta.key' must be str, got int", "o.meta.key", id="nested-path"),
        pytest.param([p("o", describe_type(Outer))], {"o": {"txns": [GOOD, {**GOOD, "hour": "3"}]}},
                     "'o.txns[1].hour' must be int, got str", "o.txns[1].hour", id="nested-list-path"),
    ],
)
def test_compile_object_refuses(params, body, message, param):
    with pytest.raises(ClientError) as info:
        compile_params(params)(body)
    assert info.value.message == message
    assert info.value.param == param
    assert info.value.status == 400


def test_object_validator_does_not_change_the_input():
    item = {**GOOD, "amount": 5}
    out = compile_params(TXNS)({"transactions": [item]})
    assert item["amount"] == 5 and type(item["amount"]) is int
    assert out["transactions"][0] is not item


class TypedItems(Service):
    @handler(batch=True, max_batch_size=8, canary={"items": [GOOD]})
    def score(self, items: list[Txn]) -> list[dict[str, Any]]:
        return [{"id": t["account_id"]} for t in items]


def test_batched_handler_with_typeddict_items_round_trips_to_the_gateway():
    spec = handler_specs(TypedItems)["score"]
    assert spec.params == [{"name": "items", "type": {"kind": "list", "item": TXN}, "required": True}]
    wired = HandlerSpec.from_wire(orjson.loads(orjson.dumps(spec.to_wire())))
    validate = compile_params(wired.params)
    assert validate(spec.options.canary) == {"items": [GOOD]}
    with pytest.raises(ClientError) as info:
        validate({"items": [GOOD, {**GOOD, "amount": None}]})
    assert info.value.param == "items[1].amount"
