"""Request schemas from type hints: describe once (in the replica), validate anywhere.

A handler's parameters become a JSON-serialisable description (`describe_params`) that the
replica sends to the gateway at start; both sides compile it into a validator
(`compile_params`) so a bad request is refused at the edge with a 400 naming the field,
without pydantic on the hot path.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from .errors import ClientError, ConfigError

TypeDesc = dict[str, Any]
Validator = Callable[[Any, str], Any]

_SCALARS: dict[Any, str] = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bytes"}


def describe_type(tp: Any) -> TypeDesc:
    """Turn a type hint into a small description: {"kind": ..., "item": ...}."""
    if tp is inspect.Parameter.empty or tp is Any or tp is object:
        return {"kind": "any"}
    if tp in _SCALARS:
        return {"kind": _SCALARS[tp]}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else Any
        return {"kind": "list", "item": describe_type(item)}
    if origin is dict or tp is dict:
        return {"kind": "dict"}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return {"kind": "optional", "item": describe_type(rest[0])}
        return {"kind": "any"}
    if tp is list:
        return {"kind": "list", "item": {"kind": "any"}}
    raise ConfigError(f"unsupported parameter type {tp!r}: use str, int, float, bool, list or dict")


def type_name(desc: TypeDesc) -> str:
    kind = desc["kind"]
    if kind == "list":
        return f"list[{type_name(desc['item'])}]"
    if kind == "optional":
        return f"{type_name(desc['item'])} | null"
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
    raise ConfigError(f"unknown type kind {kind!r}")


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
