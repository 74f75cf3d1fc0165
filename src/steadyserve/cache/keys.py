"""Cache keys and tags: one canonical form of an input, so equal inputs share one entry.

A key names everything a cached answer depends on: deployment, handler, the model version
that computed it, and the input after validation (so `{"b": 1, "a": 2}` and `{"a": 2, "b": 1}`
are one key, and `1` sent to a float field is the same as `1.0`). The input part is a
128-bit BLAKE2b digest of the canonical JSON: fixed size, whatever the input's size.

Tags say which data an answer was computed from ("account:42"); they come from templates
declared on the handler (`cache_tags=("account:{account_id}",)`) filled from the input.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_FORMATTER = string.Formatter()


def canonical(value: Any) -> bytes:
    """Stable bytes of a validated input: sorted keys, one float spelling, no whitespace."""
    return orjson.dumps(value, option=_OPTIONS)


def cache_key(deployment: str, handler: str, version: str, value: Any) -> str:
    digest = hashlib.blake2b(canonical(value), digest_size=16).hexdigest()
    return f"{deployment}/{handler}/v{version}/{digest}"


def template_fields(template: str) -> list[str]:
    """The field names a tag template reads, e.g. "account:{account_id}" → ["account_id"]."""
    return [name for _, name, _, _ in _FORMATTER.parse(template) if name]


def render_tags(templates: Iterable[str], value: Any) -> tuple[str, ...] | None:
    """Fill tag templates from one input. None when a field is missing: an answer whose data
    cannot be named cannot be invalidated, so the caller must not cache it."""
    out = []
    for template in templates:
        fields = template_fields(template)
        if not fields:
            out.append(template)
            continue
        if not isinstance(value, Mapping):
            return None
        try:
            out.append(template.format_map({f: value[f] for f in fields}))
        except (KeyError, ValueError, IndexError):
            return None
    return tuple(out)


def affinity_value(field: str | None, value: Any) -> str | None:
    """The routing key of one input: the named field's value, or None when it has none."""
    if field is None or not isinstance(value, Mapping) or field not in value:
        return None
    return str(value[field])
