"""Child processes that never outlive their parent and are stopped on purpose, never by accident.

Every child runs in its own session, so a Ctrl-C on the terminal reaches only the supervisor, which
then stops the children in the order it chooses. Each child also asks the kernel for a signal when
its parent dies (PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, Protocol

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    # Resolved in the parent: the child, between fork and exec, should only call, never load.
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


_prctl = _load_prctl()


# setpriv (util-linux) asks for the death signal and then execs the real program, so nothing
# runs Python between fork and exec. Python code there is unsafe in a process with other
# threads (gRPC's, a thread pool's): the child can crash or deadlock before it ever execs.
_SETPRIV = shutil.which("setpriv")


def _launch(argv: list[str], death_signal: signal.Signals, user: str | None) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen arguments that start `argv` as `user` with the death signal set."""
    uid, gid, groups = _user_ids(user)
    if _SETPRIV is not None:
        # Switching users in setpriv too leaves Popen nothing to do in the child, so it can vfork:
        # no fork handlers (gRPC registers some) run in a copy of this process.
        ids = [] if uid is None else ["--reuid", str(uid), "--regid", str(gid), "--clear-groups"]
        return [_SETPRIV, *ids, "--pdeathsig", death_signal.name.removeprefix("SIG"), "--", *argv], {}
    return argv, {
        "preexec_fn": _child_setup(death_signal, os.getpid()),
        "user": uid,
        "group": gid,
        "extra_groups": groups,
    }


def _child_setup(death_signal: signal.Signals, parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        if _prctl is None:
            return
        # Runs after the uid switch, which would otherwise clear the death signal again.
        _prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent_pid:
            # The parent died before the request took effect: nobody would ever stop us.
            os._exit(1)

    return setup


def _user_ids(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    if user is None:
        return None, None, None
    import pwd

    entry = pwd.getpwnam(user)
    # Drop root's groups too, not only its uid.
    return entry.pw_uid, entry.pw_gid, []


def descendants(pid: int) -> list[int]:
    """The pids of every live process below `pid` (Linux /proc), zombies excluded.

    Needed because some children leave our process group on purpose: every postgres backend and
    helper calls setsid(), so killing the postmaster's group alone would spare them.
    """
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; the fields after it do not.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].startswith(b"Z")


def kill_tree(pids: Sequence[int], timeout: float = 5.0) -> None:
    """SIGKILLs these pids and waits until each has exited (zombies count as exited)."""
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


class ChildProcess:
    """One long-running child with its output appended to a log file.

    The death signal is tied to the thread that calls `start()` (a Linux rule): start children from
    the main thread or from a thread that lives as long as they should.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        death_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.death_signal = death_signal
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Starts the child; raises RuntimeError if it is still running from an earlier start."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} starting {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            argv, extra = _launch(self.argv, self.death_signal, self.user)
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                **extra,
            )

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (negative: killed by that signal), else None."""
        return self._popen.poll() if self._popen is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the child to exit; raises subprocess.TimeoutExpired when it does not in time."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.wait(timeout)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signals the child itself (not its group); does nothing once it has exited."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(sig)

    def terminate(self, timeout: float = 20.0) -> int | None:
        """Asks the child to stop with its stop signal, SIGKILLs its group after `timeout` seconds.

        Returns the exit status, or None if it was never started. Safe to call again.
        """
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._popen.send_signal(self.stop_signal)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self._popen.wait()

    def kill(self) -> None:
        """SIGKILLs the child and all its descendants at once, the way a crash would.

        Returns once they have all exited, so a restart never meets a survivor of the old one.
        """
        if self._popen is None:
            return
        if self._popen.poll() is None:
            below = descendants(self._popen.pid)
            # The leader is not reaped yet, so the group id cannot belong to anyone else.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            kill_tree(below + descendants(self._popen.pid))
        self._popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log, for error messages; empty when there is no log yet."""
        return "\n".join(self.log_end(64 * 1024).splitlines()[-lines:])

    def log_end(self, size: int) -> str:
        """The last `size` bytes of the log as text (its first line may be cut); empty when there
        is no log yet."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - size))
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def stop_services(services: Mapping[str, ChildProcess], timeout: float = 20) -> None:
    """Stops jobstream services in the order that loses least: workers first (they hand their chunks
    back), then gateways, then schedulers (which record the hand-backs)."""
    for name in sorted(services, key=lambda n: (not n.startswith("worker"), not n.startswith("gateway"))):
        services[name].terminate(timeout=timeout)


class Logged(Protocol):
    @property
    def pid(self) -> int | None: ...
    @property
    def alive(self) -> bool: ...
    def log_tail(self, lines: int = 30) -> str: ...


def log_tails(processes: Mapping[str, Logged], lines: int = 40) -> str:
    """The end of every process's log, each under its name, pid and whether it still runs."""
    return "\n".join(
        f"== {name} (pid {proc.pid}, alive {proc.alive})\n{proc.log_tail(lines)}" for name, proc in processes.items()
    )


def replica_name(service: str, i: int) -> str:
    """`scheduler` for the first replica of a service, `scheduler-2`, `scheduler-3`, ... for the others."""
    return service if i == 1 else f"{service}-{i}"
