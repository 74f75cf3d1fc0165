"""Per-key request rate limit: a token bucket, pure (time passed in).

A key with `rate_per_s` r and `burst` b may send b requests at once, then r per second.
`take` answers whether one request may go now and, if not, how long until it could — the
Retry-After of the 429.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float  # when `tokens` was last computed


def take(bucket: Bucket | None, *, rate_per_s: float, burst: float,
         now: float) -> tuple[bool, float, Bucket]:
    """(allowed, retry_after_s, the new bucket). A missing bucket starts full; time that runs
    backwards (a clock step) refills nothing and is not held against the key."""
    if rate_per_s <= 0:
        return True, 0.0, bucket or Bucket(burst, now)
    if bucket is None:
        tokens = burst
    else:
        elapsed = max(0.0, now - bucket.at)
        tokens = min(burst, bucket.tokens + elapsed * rate_per_s)
    if tokens >= 1.0:
        return True, 0.0, Bucket(tokens - 1.0, now)
    return False, (1.0 - tokens) / rate_per_s, Bucket(tokens, now)
