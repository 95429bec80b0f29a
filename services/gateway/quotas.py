"""Per-tenant quotas a gateway enforces: the submit rate and the Watch streams open at once.

Both are counted in this process, so with N gateways a tenant may reach N times the rate and the
streams; size the settings per replica. The third quota, jobs unfinished at once, is checked in
Postgres when a job is stored (services.gateway.store), where every gateway sees the same count.
A tenant at its limit is refused with RESOURCE_EXHAUSTED and a retry hint; other tenants are not
slowed, because nothing here is shared between tenants.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from jobstream.config import Settings
from jobstream.errors import ResourceExhausted


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = -1.0

    def take(self, now: float) -> float:
        """Takes a token; returns 0, or the seconds until one will be there (taking nothing)."""
        if self.updated >= 0:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Quotas:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = settings.tenant_submit_rate
        self._burst = max(1.0, float(settings.tenant_submit_burst))
        self._max_streams = settings.tenant_max_watch_streams
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}

    def admit_submit(self, tenant_id: str) -> None:
        if self._rate <= 0:
            return
        bucket = self._buckets.setdefault(tenant_id, TokenBucket(self._rate, self._burst))
        wait = bucket.take(self._clock())
        if wait > 0:
            raise ResourceExhausted(
                f"tenant {tenant_id}: over the submit rate of {self._rate:g} per second; retry in {wait:.2f}s",
                retry_after_seconds=wait,
            )

    @contextlib.contextmanager
    def watch_stream(self, tenant_id: str) -> Iterator[None]:
        """Holds one of the tenant's Watch streams for as long as the block runs."""
        open_now = self._streams.get(tenant_id, 0)
        if 0 < self._max_streams <= open_now:
            raise ResourceExhausted(
                f"tenant {tenant_id}: {open_now} Watch streams are open, at most {self._max_streams} are allowed;"
                " retry when one ends",
                retry_after_seconds=1.0,
            )
        self._streams[tenant_id] = open_now + 1
        try:
            yield
        finally:
            left = self._streams[tenant_id] - 1
            if left:
                self._streams[tenant_id] = left
            else:
                del self._streams[tenant_id]
