"""Picking a TCP port for a child process to listen on."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a port that was free a moment ago.

    The port is released before returning, so another process may take it before the child binds
    it; callers that start a server on it see that as a start-up failure, not a silent clash.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
