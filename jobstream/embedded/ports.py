"""Picking a TCP port for a child process to listen on."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports are picked from here up to the start of the kernel's ephemeral range.
LOWEST = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 200

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
    below = _ephemeral_start()
    if below - LOWEST >= 1000:
        for _ in range(TRIES):
            port = random.randrange(LOWEST, below)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
    _given.add(chosen)
    return chosen


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    """Whether a listener could bind the port on `host` and on every address (services bind both)."""
    for address in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True
