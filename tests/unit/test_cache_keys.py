"""cache/keys.py: one canonical key per validated input, tag templates, affinity values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from steadyserve.cache.keys import affinity_value, cache_key, canonical, render_tags, template_fields
from steadyserve.schema import compile_params, describe_params


def key(value: Any, deployment: str = "d", handler: str = "h", version: str = "1") -> str:
    return cache_key(deployment, handler, version, value)


def score(self: Any, account_id: int, amount: float, meta: dict[str, Any] | None = None) -> None:
    """A handler method's signature: `amount` is a float field, so validation turns 1 into 1.0."""


VALIDATE = compile_params(describe_params(score))


# canonical form and cache_key ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({"b": 1, "a": 2}, {"a": 2, "b": 1}, id="dict-key-order"),
        pytest.param({"x": {"q": 1, "p": [1, {"z": 0, "y": 1}]}},
                     {"x": {"p": [1, {"y": 1, "z": 0}], "q": 1}}, id="nested-key-order"),
        pytest.param({"a": 1.5}, {"a": 1.50}, id="one-float-spelling"),
        pytest.param({"v": np.float32(0.5)}, {"v": 0.5}, id="numpy-scalar"),
        pytest.param({"v": np.array([1, 2, 3])}, {"v": [1, 2, 3]}, id="numpy-array"),
        pytest.param("text", "text", id="plain-string"),
        pytest.param({}, {}, id="empty"),
    ],
)
def test_equal_inputs_share_one_key(a, b):
    assert canonical(a) == canonical(b)
    assert key(a) == key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param({"a": 1}, {"a": 2}, id="value"),
        pytest.param({"a": 1}, {"b": 1}, id="field-name"),
        pytest.param([1, 2], [2, 1], id="list-order-matters"),
        pytest.param({"a": [1, [2, 3]]}, {"a": [1, [3, 2]]}, id="nested-list-order"),
        pytest.param({"a": "1"}, {"a": 1}, id="str-vs-int"),
        pytest.param({"a": None}, {}, id="null-vs-absent"),
        pytest.param({"a": True}, {"a": 1}, id="bool-vs-int"),
        # canonical() is plain JSON: it does not know the schema, so 1 and 1.0 differ here.
        # The gateway validates before keying (see the next test), which makes them equal.
        pytest.param({"a": 1}, {"a": 1.0}, id="int-vs-float-unvalidated"),
        pytest.param("ab", ["ab"], id="item-vs-list"),
    ],
)
def test_different_inputs_get_different_keys(a, b):
    assert key(a) != key(b)


def test_int_and_float_are_one_key_after_validation():
    as_int = VALIDATE({"account_id": 7, "amount": 1})
    as_float = VALIDATE({"amount": 1.0, "account_id": 7})
    assert as_int == {"account_id": 7, "amount": 1.0}
    assert type(as_int["amount"]) is float
    assert key(as_int) == key(as_float)
    # without validation the same two bodies are two keys (see the table above)
    assert key({"account_id": 7, "amount": 1}) != key({"account_id": 7, "amount": 1.0})


def test_validation_does_not_fill_defaults_so_an_explicit_default_is_another_key():
    """Documented behaviour (a missed hit, not a wrong answer): the validator leaves an absent
    optional parameter absent, so {"meta": None} and no "meta" at all are two entries."""
    bare = VALIDATE({"account_id": 7, "amount": 2.0})
    explicit = VALIDATE({"account_id": 7, "amount": 2.0, "meta": None})
    assert key(bare) != key(explicit)


def test_nested_dict_fields_are_not_coerced_by_validation():
    """A `dict` parameter is opaque to the schema: numbers inside keep their JSON type."""
    a = VALIDATE({"account_id": 1, "amount": 1.0, "meta": {"w": 1}})
    b = VALIDATE({"account_id": 1, "amount": 1.0, "meta": {"w": 1.0}})
    assert key(a) != key(b)
    c = VALIDATE({"account_id": 1, "amount": 1.0, "meta": {"y": 2, "x": 1}})
    d = VALIDATE({"meta": {"x": 1, "y": 2}, "amount": 1, "account_id": 1})
    assert key(c) == key(d)


@pytest.mark.parametrize(
    ("other", "differs_in"),
    [
        pytest.param(("d2", "h", "1"), "deployment", id="deployment"),
        pytest.param(("d", "h2", "1"), "handler", id="handler"),
        pytest.param(("d", "h", "2"), "version", id="version"),
    ],
)
def test_deployment_handler_and_version_are_part_of_the_key(other, differs_in):
    value = {"a": 1}
    base = cache_key("d", "h", "1", value)
    changed = cache_key(*other, value)
    assert base != changed, differs_in


def test_key_shape_is_readable_and_fixed_size():
    small = cache_key("embed", "embed", "fake-1", "a")
    big = cache_key("embed", "embed", "fake-1", "a" * 100_000)
    assert small.startswith("embed/embed/vfake-1/")
    digest = small.rsplit("/", 1)[1]
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert len(big) == len(small)


def test_key_is_stable_across_calls_and_processes():
    # a fixed expected value: the key must not depend on hash() salting or dict order
    assert cache_key("d", "h", "1", {"b": [1, 2.5, "x"], "a": None}) == \
        cache_key("d", "h", "1", {"a": None, "b": [1, 2.5, "x"]})
    assert canonical({"b": [1, 2.5, "x"], "a": None}) == b'{"a":null,"b":[1,2.5,"x"]}'


# tags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("templates", "value", "expected"),
    [
        pytest.param((), {"account_id": 1}, (), id="no-templates"),
        pytest.param(("account:{account_id}",), {"account_id": 42}, ("account:42",), id="int-field"),
        pytest.param(("account:{account_id}",), {"account_id": "42"}, ("account:42",),
                     id="str-field-same-tag"),
        pytest.param(("account:{account_id}", "merchant:{merchant}"),
                     {"account_id": 1, "merchant": "m9", "x": 0}, ("account:1", "merchant:m9"),
                     id="two-templates"),
        pytest.param(("pair:{a}-{b}",), {"a": 1, "b": 2}, ("pair:1-2",), id="two-fields-one-tag"),
        pytest.param(("global",), {"account_id": 1}, ("global",), id="constant-tag"),
        pytest.param(("global",), "just a string", ("global",), id="constant-tag-non-mapping"),
        pytest.param(("account:{account_id}",), {"other": 1}, None, id="missing-field-is-None"),
        pytest.param(("global", "account:{account_id}"), {}, None, id="any-missing-is-None"),
        pytest.param(("account:{account_id}",), "a batched str item", None, id="non-mapping-is-None"),
        pytest.param(("account:{account_id}",), ["account_id"], None, id="list-is-None"),
        pytest.param(("account:{account_id:>5}",), {"account_id": 7}, ("account:    7",),
                     id="format-spec"),
        pytest.param(("account:{account_id:d}",), {"account_id": "x"}, None, id="bad-format-is-None"),
    ],
)
def test_render_tags(templates, value, expected):
    assert render_tags(templates, value) == expected


@pytest.mark.parametrize(
    ("template", "fields"),
    [
        ("account:{account_id}", ["account_id"]),
        ("pair:{a}-{b}", ["a", "b"]),
        ("global", []),
        ("{{literal}}", []),
    ],
)
def test_template_fields(template, fields):
    assert template_fields(template) == fields


# affinity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param(None, {"account_id": 1}, None, id="no-field"),
        pytest.param("account_id", {"account_id": 1}, "1", id="int-as-str"),
        pytest.param("account_id", {"account_id": "1"}, "1", id="str"),
        pytest.param("account_id", {"other": 1}, None, id="missing"),
        pytest.param("account_id", "text item", None, id="non-mapping"),
        pytest.param("account_id", {"account_id": None}, "None", id="null-value"),
    ],
)
def test_affinity_value(field, value, expected):
    assert affinity_value(field, value) == expected
