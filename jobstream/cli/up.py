"""`jobstream up`: the whole system on one machine, from one command, stopped cleanly by Ctrl-C.

Starts Postgres and the broker (unless JOBSTREAM_DATABASE_URL / JOBSTREAM_KAFKA_BOOTSTRAP point
elsewhere), applies the schema, creates the topics, then runs the scheduler, the gateway and the
workers as child processes and watches them. Each child writes to its own log under
`<state-dir>/logs/`; the terminal gets one line when the system is ready and one per incident.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import grpc

from jobstream.config import Settings, SettingsError
from jobstream.db import apply_schema
from jobstream.embedded.broker import EmbeddedBroker
from jobstream.embedded.dev_key import provision_dev_token
from jobstream.embedded.postgres import EmbeddedPostgres
from jobstream.embedded.procs import ChildProcess, replica_name
from jobstream.local_files import DATABASE_URL_FILE, DEV_TOKEN_FILE, STATE_DIR, write_secret
from jobstream.topics import ensure_topics

GATEWAY_READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# A child that ran this long before dying is restarted at once, not after a growing delay.
STABLE_AFTER = 30.0
MAX_BACKOFF = 30.0


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind from wherever start-up or supervision was."""


class StartupError(RuntimeError):
    """Something did not come up; the message says what and where its log is."""


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="worker processes to run (default 2)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes, on consecutive ports (default 1)")
    parser.add_argument("--schedulers", type=int, default=1, help="scheduler processes (default 1)")
    parser.add_argument(
        "--gateway-listen",
        default=os.environ.get("JOBSTREAM_GATEWAY_LISTEN") or "127.0.0.1:50051",
        metavar="HOST:PORT",
        help="where the first gateway listens; the others take the next ports "
        "(default $JOBSTREAM_GATEWAY_LISTEN or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        metavar="DIR",
        help=f"Postgres data, logs, the dev API key and the database URL (default {STATE_DIR})",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write the gateway address here once it accepts connections",
    )


def run_up(args: argparse.Namespace) -> int:
    """Runs the stack until SIGINT/SIGTERM; 0 after a clean stop, 1 if start-up failed, 2 on bad settings."""
    if args.workers < 0:
        print("jobstream up: --workers must be 0 or more", file=sys.stderr)
        return 2
    for option, count in (("--gateways", args.gateways), ("--schedulers", args.schedulers)):
        if count < 1:
            print(f"jobstream up: {option} must be 1 or more", file=sys.stderr)
            return 2
    try:
        settings = Settings.from_env(gateway_listen=args.gateway_listen)
    except SettingsError as err:
        print(f"jobstream up: {err}", file=sys.stderr)
        return 2
    signals = _Signals()
    replicas = Replicas(gateways=args.gateways, schedulers=args.schedulers, workers=args.workers)
    stack = _Stack(settings, replicas, Path(args.state_dir).absolute(), args.ready_file, signals)
    failed = False
    with signals.installed():
        try:
            stack.start()
            stack.supervise()
        except _Interrupted:
            pass
        except Exception as err:
            failed = True
            _say(f"{'stopping after an error' if stack.ready else 'start-up failed'}: {err}")
        finally:
            signals.stopping = True
            stack.stop()
    return 1 if failed else 0


class _Signals:
    """The first SIGINT/SIGTERM unwinds (as _Interrupted); one more while stopping means hurry.

    Raising from the handler, as Python does for KeyboardInterrupt, interrupts any blocking wait
    during start-up (initdb, a slow gateway) at once, which a flag polled between steps would not.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            if not self.hurry:
                _say("stopping now, without waiting for running work")
            self.hurry = True
            return
        self.stopping = True
        raise _Interrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


@dataclass
class _Service:
    child: ChildProcess
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        self.child.start()
        self.started_at = time.monotonic()
        self.restart_at = None


@dataclasses.dataclass(frozen=True)
class Replicas:
    gateways: int = 1
    schedulers: int = 1
    workers: int = 2


def gateway_listens(first: str, count: int) -> list[str]:
    """Where each gateway listens: the first where asked, the others on the next ports."""
    host, _, port = first.rpartition(":")
    return [f"{host}:{int(port) + i}" for i in range(count)]


class _Stack:
    def __init__(
        self, settings: Settings, replicas: Replicas, state_dir: Path, ready_file: Path | None, signals: _Signals
    ) -> None:
        self.settings = settings
        self.signals = signals
        self.replicas = replicas
        self.gateways = gateway_listens(settings.gateway_listen, replicas.gateways)
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.ready_file = ready_file
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.services: list[_Service] = []
        self.ready = False

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        self.settings = dataclasses.replace(self.settings, database_url=self._database(), kafka_bootstrap=self._kafka())
        asyncio.run(apply_schema(self.settings.database_url))
        # Kept with the state, so the CLI's `tenants` and `keys` commands find this stack's Postgres.
        write_secret(self.state_dir / DATABASE_URL_FILE, self.settings.database_url)
        asyncio.run(provision_dev_token(self.settings.database_url, self.state_dir / DEV_TOKEN_FILE))
        asyncio.run(ensure_topics(self.settings))
        self._start_services()
        self._wait_for_gateways()
        self._announce()
        self.ready = True

    def _database(self) -> str:
        url = os.environ.get("JOBSTREAM_DATABASE_URL")
        if url:
            return url
        self.postgres = EmbeddedPostgres(self.state_dir / "postgres", log_path=self.logs / "postgres.log")
        return self.postgres.start()

    def _kafka(self) -> str:
        bootstrap = os.environ.get("JOBSTREAM_KAFKA_BOOTSTRAP")
        if bootstrap:
            return bootstrap
        self.broker = EmbeddedBroker(self.logs)
        return self.broker.start()

    def _start_services(self) -> None:
        env = {
            **os.environ,
            "JOBSTREAM_DATABASE_URL": self.settings.database_url,
            "JOBSTREAM_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
            "JOBSTREAM_GATEWAY_LISTEN": self.settings.gateway_listen,
            "PYTHONUNBUFFERED": "1",
            **(self.broker.client_env() if self.broker is not None else {}),
        }
        specs: list[tuple[str, dict[str, str]]] = [
            (replica_name("scheduler", i), {}) for i in range(1, self.replicas.schedulers + 1)
        ]
        specs += [
            (replica_name("gateway", i), {"JOBSTREAM_GATEWAY_LISTEN": listen})
            for i, listen in enumerate(self.gateways, 1)
        ]
        workers = range(1, self.replicas.workers + 1)
        specs += [(f"worker-{i}", {"JOBSTREAM_WORKER_ID": f"worker-{i}"}) for i in workers]
        for name, extra in specs:
            module = "services." + name.split("-")[0]
            child = ChildProcess(
                name,
                [sys.executable, "-m", module],
                log_path=self.logs / f"{name}.log",
                env={**env, **extra},
            )
            service = _Service(child)
            self.services.append(service)
            service.start()

    def _wait_for_gateways(self) -> None:
        for name, listen in zip(
            (replica_name("gateway", i) for i in range(1, len(self.gateways) + 1)), self.gateways, strict=True
        ):
            self._wait_for_gateway(name, _connect_address(listen))

    def _wait_for_gateway(self, name: str, target: str) -> None:
        deadline = time.monotonic() + GATEWAY_READY_TIMEOUT
        with grpc.insecure_channel(target) as channel:
            while True:
                for service in self.services:
                    if not service.child.alive:
                        raise StartupError(_exit_report(service.child))
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    return
                except grpc.FutureTimeoutError:
                    pass
                if time.monotonic() > deadline:
                    gateway = next(s.child for s in self.services if s.child.name == name)
                    raise StartupError(
                        f"gateway not reachable at {target} after {GATEWAY_READY_TIMEOUT:.0f} s "
                        f"(log {gateway.log_path}):\n{gateway.log_tail()}"
                    )

    def _announce(self) -> None:
        targets = [_connect_address(listen) for listen in self.gateways]
        counts = ", ".join(
            f"{n} {what}{'' if n == 1 else 's'}"
            for what, n in (("scheduler", self.replicas.schedulers), ("worker", self.replicas.workers))
        )
        print(
            f"jobstream up: gateway{'' if len(targets) == 1 else 's'} {', '.join(targets)}, {counts}, "
            f"postgres {_redact(self.settings.database_url)}, kafka {self.settings.kafka_bootstrap} "
            f"(logs in {_shown(self.logs)}; the dev tenant's API key is in {_shown(self.state_dir / DEV_TOKEN_FILE)}; "
            "Ctrl-C to stop)",
            flush=True,
        )
        if self.ready_file is not None:
            partial = self.ready_file.with_name(self.ready_file.name + ".partial")
            partial.write_text("".join(t + "\n" for t in targets))
            partial.replace(self.ready_file)

    def supervise(self) -> None:
        """Restarts what dies, with a growing delay for a child that keeps dying; returns never."""
        while True:
            time.sleep(0.5)
            self._check_infrastructure()
            now = time.monotonic()
            for service in self.services:
                if service.restart_at is None and not service.child.alive:
                    if now - service.started_at >= STABLE_AFTER:
                        service.failures = 0
                    delay = min(MAX_BACKOFF, float(2**service.failures) - 1)
                    service.failures += 1
                    service.restart_at = now + delay
                    _say(f"{_exit_report(service.child, tail=False)}; restarting in {delay:.0f} s")
                elif service.restart_at is not None and now >= service.restart_at:
                    service.start()

    def _check_infrastructure(self) -> None:
        # Restarted in place, on the same port: Postgres keeps its data; the broker comes back
        # empty, so the topics are created again (the services recover the rest from Postgres).
        if self.postgres is not None and not self.postgres.alive:
            _say(f"postgres died; restarting it (log {self.postgres.log_path})")
            self.postgres.start()
        if self.broker is not None and not self.broker.alive:
            _say(f"broker died; restarting it empty (log {self.broker.log_path})")
            self.broker.start()
            asyncio.run(ensure_topics(self.settings))

    def stop(self) -> None:
        """Stops workers, then gateway, then scheduler, then broker and Postgres; nothing is left running."""
        if self.ready:
            _say("stopping")
        # Workers get their whole drain time, so running chunks can finish and report.
        timeout = max(STOP_TIMEOUT, self.settings.drain_seconds + 5)
        for group in ("worker", "gateway", "scheduler"):
            children = [s.child for s in self.services if s.child.name.split("-")[0] == group]
            self._stop_together(children, timeout)
        infra_timeout = 0.0 if self.signals.hurry else 10.0
        if self.broker is not None:
            self.broker.stop(infra_timeout)
        if self.postgres is not None:
            self.postgres.stop(infra_timeout)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if self.ready:
            _say("stopped")

    def _stop_together(self, children: Sequence[ChildProcess], timeout: float) -> None:
        """Signals them all first, so they drain in parallel; SIGKILLs whoever is left at the deadline."""
        for child in children:
            child.send_signal(child.stop_signal)
        deadline = time.monotonic() + timeout
        while any(c.alive for c in children) and time.monotonic() < deadline and not self.signals.hurry:
            time.sleep(0.05)
        for child in children:
            child.kill()


def _exit_report(child: ChildProcess, *, tail: bool = True) -> str:
    code = child.returncode
    how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited {code}"
    report = f"{child.name} {how} (log {_shown(child.log_path)})"
    return f"{report}:\n{child.log_tail()}" if tail else report


def _connect_address(listen: str) -> str:
    """Where to reach a server that listens on `listen`: wildcard hosts mean this machine."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(message: str) -> None:
    print(f"jobstream up: {message}", file=sys.stderr, flush=True)
