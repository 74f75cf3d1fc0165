"""Request schemas from type hints: describe once (in the replica), validate anywhere.

A handler's parameters become a JSON-serialisable description (`describe_params`) that the
replica sends to the gateway at start; both sides compile it into a validator
(`compile_params`) so a bad request is refused at the edge with a 400 naming the field,
without pydantic on the hot path.

Kinds: any, str, int, float, bool, bytes, dict (any JSON object), list (with "item"),
optional (with "item"), and object — a `typing.TypedDict` class, described as
`{"kind": "object", "name": <class name>, "fields": {name: desc}, "required": [names]}`
(`total=False`, `Required[...]` and `NotRequired[...]` decide "required"). An object refuses
unknown fields, and every error names the full path of the bad value, e.g.
`transactions[3].amount`, in both the message and `param`.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import ClientError, ConfigError

try:
    import typing_extensions as _te
except ImportError:  # pragma: no cover - installed with SQLAlchemy, which needs it
    _te = None  # type: ignore[assignment]

TypeDesc = dict[str, Any]
Validator = Callable[[Any, str], Any]

_SCALARS: dict[Any, str] = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bytes"}


def describe_type(tp: Any) -> TypeDesc:
    """Turn a type hint into a small description: {"kind": ..., "item": ...}."""
    return _describe(tp, ())


def _describe(tp: Any, enclosing: tuple[type, ...]) -> TypeDesc:
    """`describe_type`, carrying the TypedDicts being described so a recursive one is refused
    at start (its description would never end) instead of overflowing the stack."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]  # metadata says nothing the validator checks
    if _is_typeddict(tp):
        return _describe_typeddict(tp, enclosing)
    if tp is inspect.Parameter.empty or tp is Any or tp is object:
        return {"kind": "any"}
    if tp in _SCALARS:
        return {"kind": _SCALARS[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else Any
        return {"kind": "list", "item": _describe(item, enclosing)}
    if origin is dict or tp is dict:
        return {"kind": "dict"}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return {"kind": "optional", "item": _describe(rest[0], enclosing)}
        return {"kind": "any"}
    if tp is list:
        return {"kind": "list", "item": {"kind": "any"}}
    raise ConfigError(
        f"unsupported parameter type {tp!r}: use str, int, float, bool, list, dict or a TypedDict"
    )


def _is_typeddict(tp: Any) -> bool:
    """True for a TypedDict class from `typing` or `typing_extensions` (which on some Python
    versions builds its own kind of class that `typing.is_typeddict` does not recognise)."""
    if not isinstance(tp, type):
        return False
    return typing.is_typeddict(tp) or (_te is not None and bool(_te.is_typeddict(tp)))


# Qualifiers around a TypedDict field's type: True / False make it required / not required,
# None only wraps (Annotated metadata and ReadOnly say nothing about what a request may hold).
_QUALIFIERS: dict[Any, bool | None] = {typing.Required: True, typing.NotRequired: False,
                                       typing.Annotated: None}
for _read_only in (getattr(typing, "ReadOnly", None), getattr(_te, "ReadOnly", None)):
    if _read_only is not None:
        _QUALIFIERS[_read_only] = None


def _describe_typeddict(tp: type, enclosing: tuple[type, ...]) -> TypeDesc:
    """Describe a TypedDict: its fields in declaration order and which of them are required.

    `__required_keys__` alone is not trusted: on Python 3.11 a module with `from __future__
    import annotations` leaves `NotRequired[...]` as a string at class creation, so the class
    lists such a key as required. The qualifier read from the resolved hints wins; a field
    without one follows the `total=` of the class that declared it (`__required_keys__`)."""
    if tp in enclosing:
        raise ConfigError(f"unsupported parameter type {tp!r}: a TypedDict may not contain itself")
    try:
        hints = typing.get_type_hints(tp, include_extras=True)
    except Exception as exc:  # NameError for an undefined forward reference, and the like
        raise ConfigError(f"cannot resolve the field types of {tp.__name__}: {exc}") from exc
    declared_required = getattr(tp, "__required_keys__", frozenset(hints))
    fields: dict[str, TypeDesc] = {}
    required: list[str] = []
    for name, hint in hints.items():
        is_required = name in declared_required
        while (origin := typing.get_origin(hint)) in _QUALIFIERS:  # NotRequired[ReadOnly[...]]
            qualifier = _QUALIFIERS[origin]
            if qualifier is not None:
                is_required = qualifier
            hint = typing.get_args(hint)[0]
        fields[name] = _describe(hint, (*enclosing, tp))
        if is_required:
            required.append(name)
    return {"kind": "object", "name": tp.__name__, "fields": fields, "required": required}


def type_name(desc: TypeDesc) -> str:
    kind = desc["kind"]
    if kind == "list":
        return f"list[{type_name(desc['item'])}]"
    if kind == "optional":
        return f"{type_name(desc['item'])} | null"
    if kind == "object":
        return f"object {desc['name']}"
    return str(kind)


def describe_params(fn: Callable[..., Any], *, skip_self: bool = True) -> list[dict[str, Any]]:
    """Describe a handler's parameters from its signature and type hints."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    params = []
    for i, (name, p) in enumerate(sig.parameters.items()):
        if skip_self and i == 0:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ConfigError(f"handler {fn.__name__}: *args/**kwargs are not supported")
        params.append({
            "name": name,
            "type": describe_type(hints.get(name, inspect.Parameter.empty)),
            "required": p.default is inspect.Parameter.empty,
        })
    return params


def _fail(path: str, desc: TypeDesc, value: Any) -> ClientError:
    got = "null" if value is None else type(value).__name__
    return ClientError(f"'{path}' must be {type_name(desc)}, got {got}", param=path)


def compile_type(desc: TypeDesc) -> Validator:
    kind = desc["kind"]
    if kind == "any" or kind == "bytes":
        return lambda v, path: v
    if kind == "str":
        def check_str(v: Any, path: str) -> Any:
            if type(v) is not str:
                raise _fail(path, desc, v)
            return v
        return check_str
    if kind == "int":
        def check_int(v: Any, path: str) -> Any:
            if type(v) is not int:
                raise _fail(path, desc, v)
            return v
        return check_int
    if kind == "float":
        def check_float(v: Any, path: str) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _fail(path, desc, v)
        return check_float
    if kind == "bool":
        def check_bool(v: Any, path: str) -> Any:
            if type(v) is not bool:
                raise _fail(path, desc, v)
            return v
        return check_bool
    if kind == "dict":
        def check_dict(v: Any, path: str) -> Any:
            if not isinstance(v, dict):
                raise _fail(path, desc, v)
            return v
        return check_dict
    if kind == "optional":
        inner = compile_type(desc["item"])
        return lambda v, path: None if v is None else inner(v, path)
    if kind == "list":
        inner = compile_type(desc["item"])
        trivial = desc["item"]["kind"] == "any"

        def check_list(v: Any, path: str) -> Any:
            if not isinstance(v, list):
                raise _fail(path, desc, v)
            if trivial:
                return v
            return [inner(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return check_list
    if kind == "object":
        return _compile_object(desc)
    raise ConfigError(f"unknown type kind {kind!r}")


def _compile_object(desc: TypeDesc) -> Validator:
    """Validate a TypedDict value: a JSON object with its required fields, each field checked
    by its own validator (so int → float coercion is the same as for a parameter), and no
    field the class does not declare. The result is a new dict holding the checked values."""
    fields = [(name, compile_type(field)) for name, field in desc["fields"].items()]
    required = frozenset(desc["required"])
    known = frozenset(desc["fields"])

    def check_object(v: Any, path: str) -> Any:
        if not isinstance(v, dict):
            raise _fail(path, desc, v)
        out: dict[str, Any] = {}
        for name, check in fields:
            if name in v:
                out[name] = check(v[name], f"{path}.{name}")
            elif name in required:
                raise ClientError(f"missing required field '{path}.{name}'", param=f"{path}.{name}")
        if len(v) > len(out):
            extra = sorted(str(k) for k in v if k not in known)
            if extra:
                raise ClientError(f"unknown field '{path}.{extra[0]}'", param=f"{path}.{extra[0]}")
        return out
    return check_object


def compile_params(params: list[dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """Build a validator: JSON object → keyword arguments, or ClientError naming the field."""
    checks = [(p["name"], compile_type(p["type"]), bool(p["required"])) for p in params]
    known = {p["name"] for p in params}

    def validate(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ClientError("request body must be a JSON object")
        out: dict[str, Any] = {}
        for name, check, required in checks:
            if name in body:
                out[name] = check(body[name], name)
            elif required:
                raise ClientError(f"missing required field '{name}'", param=name)
        if len(body) > len(out):
            extra = sorted(k for k in body if k not in known)
            if extra:
                raise ClientError(f"unknown field '{extra[0]}'", param=str(extra[0]))
        return out

    return validate
