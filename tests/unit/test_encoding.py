"""gateway/encoding.py: choose_encoding (Accept-Encoding negotiation) and compress."""

from __future__ import annotations

import gzip

import pytest
import zstandard

from steadyserve.gateway.encoding import choose_encoding, compress

BIG = 4096
MIN = 1024


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(None, None, id="no-header"),
        pytest.param("", None, id="empty-header"),
        pytest.param("gzip", "gzip", id="gzip"),
        pytest.param("zstd", "zstd", id="zstd"),
        pytest.param("GZip", "gzip", id="case-insensitive"),
        pytest.param("gzip, zstd", "zstd", id="zstd-preferred-at-equal-q"),
        pytest.param("zstd, gzip", "zstd", id="zstd-preferred-order-independent"),
        pytest.param("gzip, deflate, br", "gzip", id="browser-without-zstd"),
        pytest.param("zstd;q=0, gzip", "gzip", id="zstd-refused"),
        pytest.param("gzip;q=0", None, id="only-gzip-refused"),
        pytest.param("*", "zstd", id="star"),
        pytest.param("*;q=0.5", "zstd", id="star-with-q"),
        pytest.param("*;q=0", None, id="star-q0"),
        pytest.param("gzip, *;q=0", "gzip", id="star-q0-but-gzip-explicit"),
        pytest.param("zstd;q=0, *", "gzip", id="explicit-q0-beats-star"),
        pytest.param("identity", None, id="identity"),
        pytest.param("br, deflate", None, id="nothing-supported"),
        pytest.param("gzip;q=0.5, zstd;q=0.1", "gzip", id="higher-q-wins"),
        pytest.param("gzip;q=0.5, zstd;q=0.5", "zstd", id="equal-q-zstd"),
        pytest.param("zstd;q=abc, gzip;q=0.1", "gzip", id="malformed-q-is-zero"),
        pytest.param("gzip;q=", None, id="empty-q-is-zero"),
        pytest.param(" gzip ; q=0.8 ,  zstd ; q=0.7 ", "gzip", id="whitespace-tolerated"),
        pytest.param(",,gzip,,", "gzip", id="empty-tokens-skipped"),
    ],
)
def test_choose_encoding(header, expected):
    assert choose_encoding(header, BIG, MIN) == expected


@pytest.mark.parametrize(
    ("body_len", "min_bytes", "expected"),
    [
        pytest.param(1023, 1024, None, id="below-min"),
        pytest.param(1024, 1024, "zstd", id="at-min"),
        pytest.param(0, 0, "zstd", id="min-zero-compresses-everything"),
        pytest.param(0, 1, None, id="empty-body"),
    ],
)
def test_choose_encoding_size_threshold(body_len, min_bytes, expected):
    assert choose_encoding("zstd, gzip", body_len, min_bytes) == expected


BODY = b'{"embedding": [' + b", ".join(b"0.%06d" % (i * 7919 % 1000000) for i in range(500)) + b"]}"


@pytest.mark.parametrize(
    ("encoding", "decompress"),
    [
        pytest.param("gzip", gzip.decompress, id="gzip"),
        pytest.param("zstd", zstandard.ZstdDecompressor().decompress, id="zstd"),
    ],
)
@pytest.mark.parametrize("body", [BODY, b"", b"x"], ids=["json", "empty", "one-byte"])
def test_compress_round_trips(encoding, decompress, body):
    packed = compress(body, encoding)
    assert decompress(packed) == body


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_compress_shrinks_float_json(encoding):
    assert len(compress(BODY, encoding)) < len(BODY) // 2


@pytest.mark.parametrize(
    ("encoding", "magic"),
    [pytest.param("gzip", b"\x1f\x8b", id="gzip"), pytest.param("zstd", b"\x28\xb5\x2f\xfd", id="zstd")],
)
def test_compress_uses_the_named_format(encoding, magic):
    assert compress(BODY, encoding).startswith(magic)


@pytest.mark.parametrize("encoding", ["br", "identity", ""])
def test_compress_unknown_encoding_raises(encoding):
    with pytest.raises(ValueError):
        compress(BODY, encoding)
