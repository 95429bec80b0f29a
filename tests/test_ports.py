"""free_port picks ports that no outgoing connection can take before the child binds them: from
below the kernel's ephemeral range, never one in use, never the same one twice. Every port here
is a real socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from jobstream.embedded import ports


def test_a_port_comes_from_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    port = ports.free_port()
    assert ports.LOWEST <= port < ports.ephemeral_start()
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
        for port in range(ports.LOWEST, ports.ephemeral_start()):
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        holder.listen()
        yield port


def test_a_port_in_use_is_passed_over(listening: int) -> None:
    drawn = [listening, *ports.candidates(ports.ephemeral_start())]
    port = ports.pick("127.0.0.1", drawn, set())
    assert port != listening
    assert ports.LOWEST <= port < ports.ephemeral_start()


def test_a_port_given_before_is_passed_over() -> None:
    given: set[int] = set()
    first = ports.pick("127.0.0.1", ports.candidates(ports.ephemeral_start()), given)
    again = ports.pick("127.0.0.1", [first, *ports.candidates(ports.ephemeral_start())], given)
    assert again != first


def test_without_room_below_the_ephemeral_range_the_kernel_picks() -> None:
    no_room = ports.LOWEST + ports.MIN_ROOM - 1
    assert list(ports.candidates(no_room)) == []
    assert ports.pick("127.0.0.1", ports.candidates(no_room), set()) >= ports.ephemeral_start()
