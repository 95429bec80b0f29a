"""The per-gateway quotas' arithmetic, on a clock the test moves."""

from __future__ import annotations

import pytest

from jobstream.config import Settings
from jobstream.errors import ResourceExhausted
from services.gateway.quotas import Quotas, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)

    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(2.0)  # refills only up to the burst


def test_submit_rate_is_per_tenant_and_says_when_to_retry() -> None:
    clock = Clock()
    quotas = Quotas(Settings(tenant_submit_rate=1.0, tenant_submit_burst=2), clock)
    quotas.admit_submit("a")
    quotas.admit_submit("a")

    with pytest.raises(ResourceExhausted) as refused:
        quotas.admit_submit("a")

    assert refused.value.retry_after_seconds == pytest.approx(1.0)
    assert "tenant a" in refused.value.message and "submit rate" in refused.value.message
    quotas.admit_submit("b")  # another tenant is not slowed
    clock.now += 1.0
    quotas.admit_submit("a")


def test_no_submit_rate_when_it_is_zero() -> None:
    quotas = Quotas(Settings(tenant_submit_rate=0, tenant_submit_burst=1), Clock())
    for _ in range(100):
        quotas.admit_submit("a")


def test_watch_streams_are_counted_while_open() -> None:
    quotas = Quotas(Settings(tenant_max_watch_streams=1), Clock())
    with quotas.watch_stream("a"):
        with pytest.raises(ResourceExhausted, match="1 Watch streams are open"), quotas.watch_stream("a"):
            pass
        with quotas.watch_stream("b"):
            pass
    with quotas.watch_stream("a"):
        pass
