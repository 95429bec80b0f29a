"""free_port picks ports that no outgoing connection can take before the child binds them: from
below the kernel's ephemeral range, never one in use, never the same one twice."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobstream.embedded import ports


def test_a_port_comes_from_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    port = ports.free_port()
    assert ports.LOWEST <= port < ports._ephemeral_start()
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", port))
        listener.listen()


def test_no_port_is_handed_out_twice() -> None:
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port some other listener holds, from the range free_port picks from."""
    with socket.socket() as holder:
        for port in range(ports.LOWEST, ports._ephemeral_start()):
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        holder.listen()
        yield port


def test_a_port_in_use_is_passed_over(listening: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The held port is drawn first; the draws after it are the real ones.
    held_first = iter([listening])
    draw = random.randrange
    monkeypatch.setattr(random, "randrange", lambda low, high: next(held_first, None) or draw(low, high))
    monkeypatch.setattr(ports, "_given", set())
    assert ports.free_port() != listening
    assert next(held_first, None) is None  # it was drawn, and passed over


def test_without_room_below_the_ephemeral_range_the_kernel_picks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel_range_start = ports._ephemeral_start()
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("20500\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", narrow)
    assert ports.free_port() >= kernel_range_start
