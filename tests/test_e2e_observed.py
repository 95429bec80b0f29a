"""What an operator watching a running stack relies on: every panel of the Grafana dashboard shows
data from a real Prometheus that scraped the stack, and /readyz follows Postgres and the broker as
they go away and come back. The stack is this module's own, because the tests stop its Postgres and
broker."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from jobstream.embedded.ports import free_port
from jobstream.embedded.procs import ChildProcess
from jobstream.v1 import jobstream_pb2 as pb
from tests.conftest import client_of, running_stack
from tests.helpers import params, probes, wait_for, watch_all
from tests.stack import REPO, Stack

if TYPE_CHECKING:
    from tests.helpers import Client

pytestmark = pytest.mark.e2e

DASHBOARD = REPO / "deploy" / "grafana" / "jobstream.json"
# What Grafana puts in for its built-in variables. A minute is what $__rate_interval becomes for a
# 15 s scrape interval, and it spans all the activity the panel test causes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}


@pytest.fixture(scope="module")
async def own(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with running_stack(tmp_path_factory.mktemp("observed"), workers=1) as stack:
        yield stack


@pytest.fixture
async def ready(own: Stack) -> Stack:
    """`own` with every service running and ready, whatever an earlier test left behind."""
    for process in own.services.values():
        if not process.alive:
            process.start()
    await _wait_all_ready(own, "every service of the stack to be ready")
    return own


@pytest.fixture
async def client(ready: Stack) -> AsyncIterator[Client]:
    async with client_of(ready) as client:
        yield client


# ---------------------------------------------------------------- the dashboard on a real Prometheus


@dataclass(frozen=True)
class Target:
    panel: str
    expr: str


@dataclass
class Prometheus:
    url: str
    process: ChildProcess

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now; raises AssertionError when Prometheus refuses it."""
        address = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode()}") from None
        assert answer["data"]["resultType"] == "vector", f"{expr!r} is not an instant vector"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def without_data(self, targets: list[Target], numbers: bool) -> list[Target]:
        """The targets whose query returns no series, or (with `numbers`) only NaN, which Grafana
        draws as nothing: a quantile over counters that have not moved in the rate window."""

        def shows(result: list[dict[str, Any]]) -> bool:
            values = [float(sample["value"][1]) for sample in result]
            return any(not math.isnan(value) for value in values) if numbers else bool(values)

        return [target for target in targets if not shows(self.query(target.expr))]

    def ready(self) -> bool:
        if not self.process.alive:
            raise AssertionError(f"prometheus exited:\n{self.process.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def dashboard_targets() -> list[Target]:
    """Every query of every panel, with Grafana's variables put in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    targets = []
    for top in dashboard["panels"]:
        for panel in top.get("panels", []) if top["type"] == "row" else [top]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"panel {panel['title']!r} uses a variable this test does not fill: {expr}"
                targets.append(Target(panel["title"], expr))
    return targets


def scrape_config(stack: Stack) -> dict[str, Any]:
    """Every service of `stack` under the job name deploy/prometheus/prometheus.yml gives it: the
    dashboard selects on those names."""
    jobs: dict[str, list[str]] = {}
    for service, port in stack.metrics_ports.items():
        jobs.setdefault(f"jobstream-{service.split('-')[0]}", []).append(f"127.0.0.1:{port}")
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": addresses}]} for job, addresses in sorted(jobs.items())
        ],
    }


@pytest.fixture
async def prometheus(own: Stack, tmp_path: Path) -> AsyncIterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    config = tmp_path / "prometheus.yml"
    # JSON is YAML, and needs no YAML writer.
    config.write_text(json.dumps(scrape_config(own)), encoding="utf-8")
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    process = ChildProcess("prometheus", argv, log_path=tmp_path / "prometheus.log")
    process.start()
    try:
        server = Prometheus(f"http://127.0.0.1:{port}", process)

        async def serving() -> bool:
            return await asyncio.to_thread(server.ready)

        await wait_for(serving, within=30, what="prometheus to serve queries")
        yield server
    finally:
        process.terminate(timeout=10)


def quick_retries(max_attempts: int) -> pb.JobOptions:
    return pb.JobOptions(
        retry=pb.RetryPolicy(max_attempts=max_attempts, initial_backoff_seconds=0.05, max_backoff_seconds=0.1)
    )


async def run_every_path(client: Client) -> None:
    """Activity that moves every series the dashboard shows: a job that succeeds; a job whose chunks
    fail and are retried, one of them until it is dead-lettered and the job fails; Watch streams for
    both; and a gRPC call that fails."""
    request = pb.SubmitRequest(kind="demo.sleep", params=params(chunks=4, ms=40))
    succeeds = (await client.Submit(request)).job
    request = pb.SubmitRequest(
        kind="demo.sleep", params=params(chunks=3, ms=40, fail_attempts=1, fail_chunks="1"), options=quick_retries(2)
    )
    fails = (await client.Submit(request)).job
    ends = await asyncio.gather(watch_all(client, succeeds.id), watch_all(client, fails.id))
    assert [events[-1].type for events in ends] == [pb.JOB_SUCCEEDED, pb.JOB_FAILED]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.GetJob(pb.GetJobRequest(job_id="no-such-job"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_every_dashboard_panel_shows_data_from_a_prometheus_scraping_the_stack(
    client: Client, prometheus: Prometheus
) -> None:
    targets = dashboard_targets()
    missing: list[Target] = []

    async def every_panel_shows(numbers: bool) -> bool:
        missing[:] = await asyncio.to_thread(prometheus.without_data, targets, numbers)
        return not missing

    async def settle(numbers: bool, what: str) -> None:
        try:
            await wait_for(lambda: every_panel_shows(numbers), within=30, what=what)
        except AssertionError as timeout:
            nothing = "nothing but NaN" if numbers else "no series"
            listing = "\n".join(f"  {target.panel}: {target.expr}" for target in missing)
            raise AssertionError(f"{timeout}; these panel queries return {nothing}:\n{listing}") from None

    # A series is born with its first sample, so a rate over it is zero until it moves again: the
    # first round makes Prometheus see every series, the second moves them within the rate window.
    await run_every_path(client)
    await settle(numbers=False, what="prometheus to hold every series the dashboard queries")
    await run_every_path(client)
    await settle(numbers=True, what="every dashboard panel to show a value")


# ---------------------------------------------------------------- readiness

# How long each outage lasts before readiness is probed: longer than the periods of what the
# services do with Postgres and the broker on their own (the scheduler sweeps every 1 s and checks
# the broker every 2 s), so their own work meets the outage too.
OUTAGE_SECONDS = 3.0


def _assert_none_exited(stack: Stack) -> None:
    exited = {name: proc.returncode for name, proc in stack.services.items() if not proc.alive}
    assert not exited, f"services exited (name: status): {exited}"


async def _assert_all_alive(stack: Stack, during: str) -> None:
    """Every service still runs and answers /livez: losing a dependency takes a service out of
    rotation (readiness), it is no reason for the service to exit."""
    liveness = await probes(stack, "/livez")
    _assert_none_exited(stack)
    silent = {name: answer for name, answer in liveness.items() if answer != (200, "ok\n")}
    assert not silent, f"/livez stopped answering {during}: {silent}"


async def _wait_all_ready(stack: Stack, what: str) -> None:
    last: dict[str, tuple[int, str]] = {}

    async def all_ready() -> bool:
        _assert_none_exited(stack)  # fail at once rather than time out
        last.update(await probes(stack, "/readyz"))
        return all(status == 200 for status, _ in last.values())

    try:
        await wait_for(all_ready, within=60, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}; /readyz last answered {last}") from None


async def _live_through_outage_then_not_ready(stack: Stack, because: str) -> None:
    """Through an outage that has just begun: every service stays alive for OUTAGE_SECONDS, then
    every /readyz answers 503 with `because` as its reason.

    Only /livez is probed during the outage, as a kubelet would between its readiness probes: a
    readiness probe uses the service's connections, and would clear broken ones out of its pool
    before the service's own work meets them."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + OUTAGE_SECONDS
    while loop.time() < ends:
        await _assert_all_alive(stack, during=f"while {because}")
        await asyncio.sleep(0.2)  # the probing pace, not a wait for anything

    async def all_not_ready() -> bool:
        answers = await probes(stack, "/readyz")
        return all(status == 503 and body.startswith(f"not ready: {because}") for status, body in answers.values())

    await wait_for(all_not_ready, within=30, what=f"every service to report 'not ready: {because}'")
    await _assert_all_alive(stack, during=f"while {because}")


async def _outage(stack: Stack, stop: Callable[[], object], start: Callable[[], object], because: str) -> None:
    """Takes a dependency away, checks every service stays live but not ready, brings it back and
    waits until every service is ready again."""
    await asyncio.to_thread(stop)
    try:
        await _live_through_outage_then_not_ready(stack, because=because)
    finally:
        await asyncio.to_thread(start)
    await _wait_all_ready(stack, f"every service to be ready again after '{because}'")


async def test_readiness_turns_false_while_postgres_is_down_and_true_when_it_is_back(
    ready: Stack, client: Client
) -> None:
    await _outage(ready, ready.postgres.stop, ready.postgres.start, "postgres unreachable")

    # Ready means working: the scheduler and worker took up their loops again.
    job = (await client.Submit(pb.SubmitRequest(kind="demo.sleep", params=params(chunks=4, ms=10)))).job
    events = await watch_all(client, job.id)
    assert events[-1].type == pb.JOB_SUCCEEDED


async def test_readiness_turns_false_while_the_broker_is_down_and_true_when_it_is_back(ready: Stack) -> None:
    # Memory storage: the broker comes back empty, as a replaced cluster would.
    await _outage(ready, ready.broker.kill, ready.broker.start, "kafka unreachable")
