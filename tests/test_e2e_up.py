"""`jobstream up` with several replicas of each service, as a user runs it: every gateway answers,
the CLI spreads its calls over them, and stopping it leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobstream.embedded.ports import bindable, free_port
from jobstream.embedded.procs import ChildProcess, descendants
from jobstream.embedded.stack import REPO
from jobstream.gateway_channel import spread
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e


def test_one_gateway_address_is_used_as_given() -> None:
    assert spread("127.0.0.1:5000", ()) == ("127.0.0.1:5000", ())


def test_several_gateway_addresses_are_called_round_robin() -> None:
    target, options = spread("127.0.0.1:5000, 127.0.0.1:5001", (("grpc.x", 1),))
    assert target == "ipv4:127.0.0.1:5000,127.0.0.1:5001"
    assert options == (("grpc.x", 1), ("grpc.lb_policy_name", "round_robin"))


def _consecutive_free_ports(count: int) -> int:
    """A port such that it and the next count-1 ones are free now, from where free_port picks (no
    outgoing connection takes them before `up` binds them)."""
    while True:
        first = free_port()
        if first + count <= 65535 and all(bindable("127.0.0.1", port) for port in range(first + 1, first + count)):
            return first


async def test_up_runs_replicas_of_every_service_and_stops_them_all(tmp_path: Path) -> None:
    first = _consecutive_free_ports(2)
    ready = tmp_path / "ready"
    argv = [
        *(sys.executable, "-m", "jobstream.cli.main", "up"),
        *("--gateways", "2", "--schedulers", "2", "--workers", "2"),
        *("--gateway-listen", f"127.0.0.1:{first}", "--state-dir", str(tmp_path / "state")),
        *("--ready-file", str(ready)),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTREAM_")}
    up = ChildProcess("up", argv, log_path=tmp_path / "up.log", env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO)
    up.start()
    try:

        async def is_ready() -> bool:
            assert up.alive, f"jobstream up exited:\n{up.log_tail(40)}"
            return ready.exists()

        await wait_for(is_ready, within=90, what="jobstream up to be ready")
        gateways = ready.read_text().split()
        assert gateways == [f"127.0.0.1:{first}", f"127.0.0.1:{first + 1}"]
        assert up.pid is not None
        children = descendants(up.pid)
        services = [_cmdline(pid) for pid in children]
        assert sum("services.scheduler" in c for c in services) == 2, services
        assert sum("services.gateway" in c for c in services) == 2, services
        assert sum("services.worker" in c for c in services) == 2, services

        token = (tmp_path / "state" / "dev-token").read_text().strip()
        cli = [sys.executable, "-m", "jobstream.cli.main"]
        submit = ["submit", "demo.sleep", "--param", "chunks=4", "--param", "ms=10", "--watch"]
        for gateway in [*gateways, ",".join(gateways)]:
            done = await asyncio.to_thread(
                subprocess.run,
                [*cli, "--gateway", gateway, "--token", token, *submit],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**env, "PYTHONPATH": str(REPO)},
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"through {gateway}: {done.stdout}{done.stderr}"
            assert "SUCCEEDED" in done.stdout

        up.send_signal(signal.SIGTERM)
        await asyncio.to_thread(up.wait, 60)
        assert up.returncode == 0, up.log_tail(40)
        assert [pid for pid in children if _running(pid)] == []
    finally:
        up.terminate(30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
