"""cache/invalidation.py: which tag lists an invalidation may carry (count, length, the reserved
"*"), and how the gateway splits a broadcast into messages a replica accepts."""

from __future__ import annotations

from typing import Any

import pytest

from steadyserve import codec
from steadyserve.cache.invalidation import (
    ALL_TAGS,
    MESSAGE_MAX_BYTES,
    MESSAGE_MAX_TAGS,
    REPLICA_MAX_TAG_BYTES,
    check_tags,
    messages,
    tag_bytes,
)
from steadyserve.errors import ClientError, PayloadTooLarge

LIMITS: dict[str, Any] = {"max_tags": 3, "max_tag_bytes": 10}


@pytest.mark.parametrize(
    ("tags", "status", "words"),
    [
        pytest.param(None, 400, "non-empty list", id="missing"),
        pytest.param("account:1", 400, "non-empty list", id="a-string"),
        pytest.param([], 400, "non-empty list", id="empty"),
        pytest.param(["a", "b", "c", "d"], 413, "at most 3 tags", id="too-many"),
        # counted first: the 413 comes before looking at any (bad) item
        pytest.param([1, 2, 3, 4], 413, "max_invalidation_tags", id="too-many-of-anything"),
        pytest.param(["a", 1], 400, "tags[1] must be a non-empty string", id="an-int"),
        pytest.param(["a", ""], 400, "tags[1] must be a non-empty string", id="an-empty-string"),
        pytest.param(["a", "x" * 11], 400, "tags[1] is 11 bytes", id="too-long"),
        pytest.param(["é" * 6], 400, "12 bytes", id="too-long-in-utf8"),
        pytest.param([ALL_TAGS], 400, "reserved", id="the-all-tag"),
        pytest.param(["a", ALL_TAGS], 400, "{\"all\": true}", id="all-tag-says-how"),
    ],
)
def test_refused(tags: Any, status: int, words: str) -> None:
    with pytest.raises(ClientError) as info:
        check_tags(tags, **LIMITS)
    err = info.value
    assert err.status == status and err.param == "tags"
    assert isinstance(err, PayloadTooLarge) is (status == 413)
    assert words in err.message


@pytest.mark.parametrize(
    ("tags", "allow_all"),
    [
        pytest.param(["a"], False, id="one"),
        pytest.param(["a", "b", "c"], False, id="at-the-count"),
        pytest.param(["x" * 10], False, id="at-the-length"),
        pytest.param(["é" * 5], False, id="at-the-length-in-utf8"),
        pytest.param([ALL_TAGS], True, id="all-where-allowed"),
        pytest.param(["a", "a"], False, id="repeats-are-kept"),
    ],
)
def test_accepted(tags: list[str], allow_all: bool) -> None:
    assert check_tags(tags, **LIMITS, allow_all=allow_all) == tags


def test_the_param_is_named_as_asked() -> None:
    with pytest.raises(ClientError) as info:
        check_tags(["a", 5], max_tags=3, max_tag_bytes=10, param="labels")
    assert info.value.param == "labels" and "labels[1]" in info.value.message


@pytest.mark.parametrize(
    ("tag", "size"), [("abc", 3), ("é", 2), ("日本", 6), ("\U0001f600", 4), ("\ud800", 3)],
    ids=["ascii", "latin", "cjk", "emoji", "lone-surrogate"],
)
def test_tag_bytes_counts_utf8(tag: str, size: int) -> None:
    assert tag_bytes(tag) == size


# messages to replicas ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "sizes"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param(["a"], [1], id="one"),
        pytest.param([f"t{i}" for i in range(MESSAGE_MAX_TAGS)], [MESSAGE_MAX_TAGS], id="at-the-count"),
        pytest.param([f"t{i}" for i in range(2 * MESSAGE_MAX_TAGS + 1)],
                     [MESSAGE_MAX_TAGS, MESSAGE_MAX_TAGS, 1], id="over-the-count"),
        # 1,000 tags of 4 KiB are 4 MiB: split by bytes, about 255 to a message
        pytest.param(["x" * REPLICA_MAX_TAG_BYTES] * MESSAGE_MAX_TAGS, [255, 255, 255, 235],
                     id="over-the-bytes"),
    ],
)
def test_messages_fit_what_a_replica_accepts(tags: list[str], sizes: list[int]) -> None:
    chunks = list(messages(tags))
    assert [len(c) for c in chunks] == sizes
    assert [t for c in chunks for t in c] == tags  # all of them, in order
    for chunk in chunks:
        assert len(codec.encode({"tags": chunk})) <= MESSAGE_MAX_BYTES
        assert check_tags(chunk, max_tags=MESSAGE_MAX_TAGS, max_tag_bytes=REPLICA_MAX_TAG_BYTES,
                          allow_all=True) == chunk


def test_a_tag_a_replica_would_refuse_turns_the_broadcast_into_all() -> None:
    """Only when [cache] max_tag_bytes is set above what replicas accept: dropping every tagged
    entry costs hits, missing the invalidation would serve old data."""
    assert list(messages(["a", "x" * (REPLICA_MAX_TAG_BYTES + 1)])) == [[ALL_TAGS]]
