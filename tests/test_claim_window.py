"""How far ahead of its free slots a worker claims, from how long its chunks ran lately."""

from __future__ import annotations

from services.worker.window import CLAIM_AHEAD_SECONDS, ClaimWindow


def test_before_any_chunk_ran_a_worker_claims_only_its_slots() -> None:
    assert ClaimWindow(concurrency=8, prefetch=24).size == 8


def test_chunks_of_a_millisecond_fill_the_whole_prefetch() -> None:
    window = ClaimWindow(concurrency=8, prefetch=24)
    window.ran(0.001)
    assert window.size == 8 + 24


def test_chunks_longer_than_the_claim_ahead_time_are_not_claimed_ahead() -> None:
    window = ClaimWindow(concurrency=8, prefetch=24)
    window.ran(8 * CLAIM_AHEAD_SECONDS * 2)
    assert window.size == 8


def test_what_is_claimed_ahead_would_start_within_the_claim_ahead_time() -> None:
    window = ClaimWindow(concurrency=4, prefetch=100)
    window.ran(0.01)  # a slot frees every 2.5 ms
    assert window.size == 4 + int(4 * CLAIM_AHEAD_SECONDS / 0.01)


def test_a_switch_to_long_chunks_stops_claiming_ahead_within_a_few_chunks() -> None:
    window = ClaimWindow(concurrency=8, prefetch=24)
    for _ in range(100):
        window.ran(0.0005)
    window.ran(2.0)
    window.ran(2.0)
    assert window.size == 8


def test_no_prefetch_claims_only_the_slots() -> None:
    window = ClaimWindow(concurrency=8, prefetch=0)
    window.ran(0.0)
    assert window.size == 8
