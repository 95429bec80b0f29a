"""How many chunks a worker holds at once: its slots, plus those it claims ahead.

A claim costs a Postgres and a broker round trip however many chunks it takes, so a worker whose
chunks take a millisecond would spend its time claiming if it claimed only as many as it has free
slots. It claims more, but only as many as it expects to start within CLAIM_AHEAD_SECONDS, judged
by how long its chunks ran lately: a chunk claimed ahead waits on this worker while another might
have run it, and it counts as running (Cancel interrupts it rather than refusing its claim).
"""

from __future__ import annotations

# A chunk claimed ahead is expected to start within about this long.
CLAIM_AHEAD_SECONDS = 0.05
# The weight of the newest chunk in the running mean of chunk durations.
DURATION_WEIGHT = 0.2


class ClaimWindow:
    def __init__(self, concurrency: int, prefetch: int) -> None:
        self._concurrency = concurrency
        self._prefetch = prefetch
        # Unknown until a chunk has run: claim no further ahead than the slots until then.
        self.mean_duration_s: float | None = None

    def ran(self, seconds: float) -> None:
        """A chunk's code ran this long."""
        if self.mean_duration_s is None:
            self.mean_duration_s = seconds
        else:
            self.mean_duration_s += DURATION_WEIGHT * (seconds - self.mean_duration_s)

    @property
    def size(self) -> int:
        """Chunks the worker may hold, running or waiting for a slot."""
        if self.mean_duration_s is None or self._prefetch == 0:
            return self._concurrency
        # A slot frees every mean / concurrency seconds on average.
        ahead = self._prefetch
        if self.mean_duration_s > 0:
            ahead = min(ahead, int(self._concurrency * CLAIM_AHEAD_SECONDS / self.mean_duration_s))
        return self._concurrency + ahead
