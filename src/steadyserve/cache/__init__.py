"""Caches: keys and tags, the in-process store, Redis, singleflight, the gateway's tiered
response cache, and the read-through cache services use for intermediate results."""

from .keys import cache_key, canonical, render_tags
from .memory import MemoryCache
from .readthrough import ReadThrough
from .singleflight import LeaderGone, Singleflight

__all__ = ["LeaderGone", "MemoryCache", "ReadThrough", "Singleflight", "cache_key", "canonical",
           "render_tags"]
