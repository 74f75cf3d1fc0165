"""What an invalidation may name, and how it travels to replicas: tag count and length limits,
the reserved "every tagged entry" tag, and the gateway → replica message size.

An invalidation is remembered (tag → epoch) by every cache it reaches, so an unbounded one is
a memory attack: one request with 10,000 unique tags costs every gateway and every replica.
The public API and handlers declared with `invalidates=` are checked against the `[cache]`
limits (`max_invalidation_tags`, `max_tag_bytes`); a replica, which does not read the
gateway's configuration, checks the fixed message limits here, and the gateway splits its
broadcasts to fit them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Final

from ..errors import ClientError, PayloadTooLarge

ALL_TAGS: Final = "*"  # every tagged entry: after a missed invalidation, or `{"all": true}`
MESSAGE_MAX_TAGS: Final = 1000  # tags in one gateway → replica /invalidate message
MESSAGE_MAX_BYTES: Final = 1 << 20  # one /invalidate body (msgpack) at most
REPLICA_MAX_TAG_BYTES: Final = 4096  # one tag, as a replica accepts it (16 × the [cache] default)
_FRAMING_BYTES: Final = 64  # msgpack map/array headers and a tag's length prefix, with room


def tag_bytes(tag: str) -> int:
    """A tag's length in UTF-8 bytes (what the limits count: a key in Redis is bytes)."""
    return len(tag) if tag.isascii() else len(tag.encode("utf-8", "surrogatepass"))


def check_tags(
    tags: object, *, max_tags: int, max_tag_bytes: int, allow_all: bool = False, param: str = "tags",
) -> list[str]:
    """The tags of one invalidation request, or a ClientError naming `param`: a list of 1 to
    `max_tags` non-empty strings (413 beyond), each at most `max_tag_bytes` long (400), and no
    ALL_TAGS unless `allow_all` (the public API asks for it with an explicit flag instead)."""
    if not isinstance(tags, list) or not tags:
        raise ClientError(f"send {{\"{param}\": [\"account:42\", ...]}}: a non-empty list of strings",
                          param=param)
    if len(tags) > max_tags:
        # counted before anything else: the cost of a request must not grow with what it is refused for
        raise PayloadTooLarge(f"at most {max_tags:,} tags per invalidation ([cache] "
                              f"max_invalidation_tags), got {len(tags):,}", param=param)
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag:
            raise ClientError(f"{param}[{i}] must be a non-empty string", param=param)
        # characters <= bytes, and equal for ASCII: encode only the rare long non-ASCII tag
        if len(tag) > max_tag_bytes or (not tag.isascii() and tag_bytes(tag) > max_tag_bytes):
            raise ClientError(f"{param}[{i}] is {tag_bytes(tag):,} bytes; a tag is at most "
                              f"{max_tag_bytes:,} ([cache] max_tag_bytes)", param=param)
        if tag == ALL_TAGS and not allow_all:
            raise ClientError(f"{param}[{i}]: {ALL_TAGS!r} is reserved (it drops every tagged entry); "
                              "send {\"all\": true} without tags to ask for that", param=param)
    return tags


def messages(tags: Sequence[str]) -> Iterator[list[str]]:
    """Split tags into replica messages within MESSAGE_MAX_TAGS and MESSAGE_MAX_BYTES. A tag a
    replica would refuse (over REPLICA_MAX_TAG_BYTES: the gateway's max_tag_bytes is set above
    it) makes the whole broadcast ALL_TAGS: the replicas then drop every tagged entry, which
    costs hits but never serves data older than an update."""
    sizes = [tag_bytes(t) for t in tags]
    if sizes and max(sizes) > REPLICA_MAX_TAG_BYTES:
        yield [ALL_TAGS]
        return
    per_tag = _FRAMING_BYTES // 8
    start, size = 0, _FRAMING_BYTES
    for i, n in enumerate(sizes):
        if i > start and (i - start >= MESSAGE_MAX_TAGS or size + n + per_tag > MESSAGE_MAX_BYTES):
            yield list(tags[start:i])
            start, size = i, _FRAMING_BYTES
        size += n + per_tag
    if start < len(sizes):
        yield list(tags[start:])


def request_schema(*, max_tags: int, max_tag_bytes: int) -> dict[str, object]:
    """JSON Schema of `POST /v1/cache/invalidate` (the OpenAPI document), beside the checks:
    `{"tags": [...]}` within the limits, or `{"all": true}` alone."""
    tag = {"type": "string", "minLength": 1, "maxLength": max_tag_bytes,
           "not": {"const": ALL_TAGS}}
    return {"oneOf": [
        {"type": "object", "required": ["tags"],
         "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": max_tags,
                                 "items": tag},
                        "all": {"const": False}}},
        {"type": "object", "required": ["all"], "properties": {"all": {"const": True}},
         "not": {"required": ["tags"]}},
    ]}
