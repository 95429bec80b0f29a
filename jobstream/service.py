"""What every service process does the same way: logging, settings, and stopping on signals.

Each service's `__main__` calls `run(serve)`: SIGINT/SIGTERM set the stop event, `serve` stops
taking work, drains what it runs and closes its connections, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

from jobstream.config import Settings, SettingsError
from jobstream.kinds import load_kinds
from jobstream.topics import check_partition_counts

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job_id", "chunk", "attempt", "worker"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: Settings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # Joins, generations and assignments: what explains a member that takes no work.
    logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.INFO)


STOP_GRACE_SECONDS = 10.0


class _Process:
    """The running service's stop event, and whether an essential task failed."""

    stop: asyncio.Event | None = None
    failed = False


def essential(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Starts a background task the service cannot work without (the outbox relay, the updates
    feed, the heartbeat). Such a loop handles the outages it expects itself; if it ends anyway
    (a bug), the service stops and exits 1, so its supervisor restarts a whole process instead
    of one that looks alive and ready while a piece of it is gone."""
    task = asyncio.create_task(coro, name=name)

    def ended(done: asyncio.Task[Any]) -> None:
        if done.cancelled() or (_Process.stop is not None and _Process.stop.is_set()):
            return
        err = done.exception()
        logging.getLogger(__name__).error("%s ended unexpectedly; stopping the service", name, exc_info=err)
        _Process.failed = True
        if _Process.stop is not None:
            _Process.stop.set()

    task.add_done_callback(ended)
    return task


def freeze_startup_objects() -> None:
    """Takes what the imports made out of the garbage collector's sight for good.

    A full collection walks every tracked object, and the modules a service imports (grpc,
    protobuf, aiokafka, psycopg, the job kinds) hold about 50,000 that live as long as the process.
    The event loop answers nothing while it walks. At 500 Submits/s on two busy cores, the longest
    full collection took 21-28 ms in the gateway, 36-63 ms in the scheduler and 65-115 ms in a
    worker; with those objects frozen, 13-14, 13-14 and 26-33 ms.
    """
    gc.collect()
    gc.freeze()


# Container objects allocated, net of those freed, before a young-generation collection; the
# interpreter's default is 700. The older generations keep their default ratios.
YOUNG_COLLECTION_THRESHOLD = 10_000


def collect_young_less_often() -> None:
    """Lets a batch's objects die before the collector looks at them.

    A service works in batches: a fetch of records, a batch of rows, the messages built from them,
    all freed together a few milliseconds later. At the default threshold the collector ran about
    twenty times a second in the middle of such batches, walked every object still in use and
    promoted it to an older generation, which it walked again about twice a second. At 500
    Submits/s its pauses added up to 9-19% of the scheduler's CPU time and 2-3% of the gateway's;
    at 10,000, to 1.4-3.4% and 1.0-1.8%.
    A young collection then takes longer (10-30 ms of a busy box's wall time in the scheduler,
    against 1-1.5 ms) but comes about seventy times less often there (docs/capacity.md).
    """
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def _refuse(service: str, err: SettingsError) -> NoReturn:
    print(f"jobstream {service}: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _hard_exit(service: str, why: str) -> None:
    logging.getLogger(service).error("%s exiting at once: %s", service, why)
    logging.shutdown()
    os._exit(1)


def run(service: str, serve: Serve) -> None:
    """Runs `serve` until SIGINT/SIGTERM; exits 2 on bad settings (partition counts that differ
    from the topics' among them), 1 when serve or an essential task fails."""
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        _refuse(service, err)
    setup_logging(settings, service)
    load_kinds(settings.kind_modules)
    freeze_startup_objects()
    collect_young_less_often()

    async def main() -> None:
        stop = _Process.stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                _hard_exit(service, "second signal")
            stop.set()
            # A clean stop drains and closes connections; if a dependency is gone that can hang
            # (a flush to a dead broker), so the process leaves anyway once the drain time is over.
            loop.call_later(settings.drain_seconds + STOP_GRACE_SECONDS, _hard_exit, service, "stop took too long")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await check_partition_counts(settings)
        except SettingsError as err:
            _refuse(service, err)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except Exception:
        logging.getLogger(service).exception("%s stopped on an error", service)
        raise SystemExit(1) from None
    if _Process.failed:
        raise SystemExit(1)
