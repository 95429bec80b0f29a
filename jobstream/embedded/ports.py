"""Picking a TCP port for a child process to listen on."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

# Ports are picked from here up to the start of the kernel's ephemeral range.
LOWEST = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 200
# Less room than this below the ephemeral range, and the kernel picks.
MIN_ROOM = 1000

# Handed out by this process: picked at random, two calls could otherwise return the same port
# before either child has bound it.
_given: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a port that was free a moment ago, for a child process to listen on.

    The port is released before returning, so the child binds it a little later. It comes from
    below the kernel's ephemeral range: the kernel gives ports from that range to every outgoing
    connection of every process, so a port picked there (as binding port 0 picks one) was now and
    then taken by a connection to the broker or Postgres before the child bound it, and the child
    failed to start with "address already in use". Where no room is left below that range, the
    kernel picks, as before.
    """
    return pick(host, candidates(ephemeral_start()), _given)


def candidates(below: int) -> Iterator[int]:
    """Ports drawn at random from LOWEST up to `below`; none when that leaves fewer than MIN_ROOM."""
    if below - LOWEST < MIN_ROOM:
        return iter(())
    return (random.randrange(LOWEST, below) for _ in range(TRIES))


def pick(host: str, ports: Iterable[int], given: set[int]) -> int:
    """The first of `ports` not in `given` that a listener could bind, else one the kernel picks;
    added to `given`."""
    for port in ports:
        if port not in given and bindable(host, port):
            given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
    given.add(chosen)
    return chosen


def ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def bindable(host: str, port: int) -> bool:
    """Whether a listener could bind the port on `host` and on every address (services bind both)."""
    for address in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True
