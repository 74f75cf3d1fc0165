"""The series store's history read back from the database after a restart, bounded.

The alerting engine appends the finished per-minute points of every series to the database
each minute (`SeriesStore.snapshot_for_persistence`) and prunes them after 3 days. A
restarted gateway reads back the series something looks back on:

    steadyserve_requests_total                      the burn-rate windows of the SLO rules,
                                                    the dashboard's throughput and 5xx
    steadyserve_request_duration_seconds_bucket     the dashboard's p50/p95/p99

for its configured deployments only (an old one's series would keep stale burn rates
alive), over `RESTORE_S`. Bounded: at most `max_rows` points in all (`[alerting]
history_restore_max_points`, default 400,000), the newest of each name
first in the order above (a long history of a large fleet keeps its last hours and loses
its oldest), read in pages of `PAGE_ROWS` and loaded page by page, so memory holds one page
of rows at a time. Runs synchronously: the engine calls it on its database thread before its
loops start (nothing else reads the store then).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from typing import Any, Protocol

from .timeseries import SeriesStore, labels_of

log = logging.getLogger("steadyserve.alerting")

RESTORED = ("steadyserve_requests_total", "steadyserve_request_duration_seconds_bucket")
RESTORE_S = 3 * 86_400.0  # the dashboard's longest window, and the points' retention
PAGE_ROWS = 10_000


class SeriesSource(Protocol):
    """What this reads from `store.Database`."""

    def series_points(self, name: str, since: float, until: float, limit: int = ...
                      ) -> list[tuple[str, dict[str, Any], float, float]]: ...

    def series_start(self, name: str, since: float, until: float, rows: int) -> float: ...


def restore(db: SeriesSource, store: SeriesStore, deployments: Collection[str], now: float,
            max_rows: int, *, names: tuple[str, ...] = RESTORED, window_s: float = RESTORE_S,
            page_rows: int = PAGE_ROWS) -> dict[str, int]:
    """Load the last `window_s` of each of `names` (for `deployments`) into `store`;
    returns the points loaded per name. Raises what the database raises."""
    left = max_rows
    loaded: dict[str, int] = {}
    until = math.nextafter(now, math.inf)  # a point written at `now` is history too
    for name in names:
        if left <= 0:
            loaded[name] = 0
            log.warning("history of %s not restored: %d points of earlier names read",
                        name, max_rows)
            continue
        # the newest `left` points of this name start here (or at the window's start)
        since = db.series_start(name, now - window_s, until, left)
        if since > now - window_s:
            log.warning("history of %s restored from %.1f h ago only: older points are over "
                        "the restore's bound (%d points)", name, (now - since) / 3600, max_rows)
        read = count = repeated = 0
        while True:
            page = db.series_points(name, since, until, page_rows)
            read += len(page) - repeated
            count += store.load((n, labels_of(labels), t, v) for n, labels, t, v in page
                                if isinstance(labels, dict)
                                and labels.get("deployment") in deployments)
            # points at one instant may pass the bound a little; never more than a page
            if len(page) < page_rows or read >= left + page_rows:
                break
            # the next page starts at the last time read (its points there repeat, and the
            # store skips them); a page all at one instant moves on past it
            last = page[-1][2]
            if last > since:
                since, repeated = last, sum(1 for p in page if p[2] == last)
            else:
                since, repeated = math.nextafter(since, math.inf), 0
        left -= read
        loaded[name] = count
    return loaded
