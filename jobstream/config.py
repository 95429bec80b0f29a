"""One typed settings object for every service, read once from JOBSTREAM_* environment variables.

Every field has a default that works for the embedded stack; a value that does not parse or is out
of range stops the process at start with a message naming the variable, instead of failing later.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A JOBSTREAM_* variable is malformed; the message names it."""


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Settings:
    # Where the shared infrastructure is.
    database_url: str = "postgresql://postgres@127.0.0.1:5432/jobstream"
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Prefix for every topic and consumer group, so several stacks can share one Kafka cluster.
    topic_prefix: str = ""
    # Partition counts are fixed at topic creation (brokers may not grow them): choose up front.
    job_partitions: int = 12
    chunk_partitions: int = 24
    replication_factor: int = 1
    # How long a fetch waits when there is nothing to read. Apache Kafka answers as soon as a record
    # arrives; the embedded broker looks again at 0, W/2, 3W/4, ... of the wait W, so a record
    # waits up to W/2 per hop. Shorter is not faster on a shared box: every empty look costs the
    # embedded broker CPU. With every consumer at 10 ms an idle stack spent more than a core on
    # them (event p99 318 ms against 158 ms at 25 ms); with the scheduler and gateway alone at
    # 10 ms, the idle broker used 50-55% of a core instead of 22-25%, for an event p50 about 7 ms
    # lower at 1,000 events/s.
    kafka_fetch_wait_ms: int = 25
    # The same for the workers' chunk feed, where a few more milliseconds matter least: a busy feed
    # never waits, and an idle one delays only the first chunk that arrives. At 200 Submits/s,
    # four workers fetching at 25 ms cost the embedded broker and themselves about 9% of a core
    # more than at 100 ms.
    kafka_chunk_fetch_wait_ms: int = 100
    # The same for the workers' cancel feed. Every empty fetch costs the broker work, and a cancel
    # can afford to arrive this much later: the CANCELLED event does not wait for it.
    kafka_control_fetch_wait_ms: int = 100
    # Whether a stopping group member tells the broker it leaves (its partitions move at once) or
    # lets its session expire. The embedded broker strands a group for good when its leader leaves
    # in the middle of a rebalance, so members of that broker stay silent instead.
    kafka_leave_group: bool = True
    # Security of every Kafka client: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SASL mechanism
    # PLAIN or SCRAM-SHA-256/512 with a user and password; a CA file (PEM) to verify brokers with.
    # Postgres security goes in JOBSTREAM_DATABASE_URL (sslmode, sslrootcert, ...).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""

    # Gateway.
    gateway_listen: str = "127.0.0.1:50051"
    # TLS on the gateway: PEM files. Without a certificate the gateway speaks plaintext (put it
    # behind a TLS-terminating proxy then). With a client CA, every client must present a
    # certificate it signed (mTLS).
    gateway_tls_cert: str = ""
    gateway_tls_key: str = ""
    gateway_tls_client_ca: str = ""
    max_input_bytes: int = 16 * 1024 * 1024
    max_chunks_per_job: int = 100_000
    # Per-tenant quotas (0 = none). The submit rate and the Watch streams are counted per gateway,
    # the unfinished jobs across all of them.
    tenant_submit_rate: float = 1000.0
    tenant_submit_burst: int = 2000
    tenant_max_unfinished_jobs: int = 100_000
    tenant_max_watch_streams: int = 10_000

    # Scheduler.
    progress_interval_ms: int = 200

    # Worker.
    worker_id: str = field(default_factory=_default_worker_id)
    worker_concurrency: int = 8
    # At most this many chunks a worker claims beyond its free slots, to start as slots free. A claim
    # costs a Postgres and a broker round trip whatever the number of chunks, so chunks of a few
    # milliseconds run at the rate of those round trips unless each claims more than the slots just
    # freed. A worker claims ahead only what it expects to start within moments (see
    # services/worker/window.py), so long chunks are not held back from other workers; 0: never.
    worker_prefetch: int = 64
    lease_seconds: float = 10.0
    heartbeat_seconds: float = 3.0
    drain_seconds: float = 20.0

    # Every service.
    metrics_port: int = 0  # 0 = no metrics endpoint
    log_level: str = "INFO"
    log_json: bool = False
    # Extra modules that register job kinds, comma separated (besides the jobstream.kinds entry points).
    kind_modules: tuple[str, ...] = ()
    db_pool_max: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Reads JOBSTREAM_<FIELD> for every field; raises SettingsError naming a malformed variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"JOBSTREAM_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, raw, f.type)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {
            "JOBSTREAM_JOB_PARTITIONS": self.job_partitions,
            "JOBSTREAM_CHUNK_PARTITIONS": self.chunk_partitions,
            "JOBSTREAM_REPLICATION_FACTOR": self.replication_factor,
            "JOBSTREAM_WORKER_CONCURRENCY": self.worker_concurrency,
            "JOBSTREAM_MAX_INPUT_BYTES": self.max_input_bytes,
            "JOBSTREAM_MAX_CHUNKS_PER_JOB": self.max_chunks_per_job,
            "JOBSTREAM_LEASE_SECONDS": self.lease_seconds,
            "JOBSTREAM_HEARTBEAT_SECONDS": self.heartbeat_seconds,
            "JOBSTREAM_DB_POOL_MAX": self.db_pool_max,
        }
        for name, value in positive.items():
            if value <= 0:
                raise SettingsError(f"{name} must be positive, got {value}")
        if self.worker_prefetch < 0:
            raise SettingsError(f"JOBSTREAM_WORKER_PREFETCH must not be negative, got {self.worker_prefetch}")
        if self.heartbeat_seconds >= self.lease_seconds:
            raise SettingsError(
                "JOBSTREAM_HEARTBEAT_SECONDS must be shorter than JOBSTREAM_LEASE_SECONDS "
                f"({self.heartbeat_seconds} >= {self.lease_seconds})"
            )
        if self.kafka_security_protocol not in KAFKA_PROTOCOLS:
            raise SettingsError(
                f"JOBSTREAM_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_PROTOCOLS)},"
                f" got {self.kafka_security_protocol!r}"
            )
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            raise SettingsError(
                f"JOBSTREAM_KAFKA_SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)},"
                f" got {self.kafka_sasl_mechanism!r}"
            )
        if bool(self.gateway_tls_cert) != bool(self.gateway_tls_key):
            raise SettingsError("JOBSTREAM_GATEWAY_TLS_CERT and JOBSTREAM_GATEWAY_TLS_KEY go together")
        if self.gateway_tls_client_ca and not self.gateway_tls_cert:
            raise SettingsError("JOBSTREAM_GATEWAY_TLS_CLIENT_CA needs JOBSTREAM_GATEWAY_TLS_CERT and _KEY")
        if ":" not in self.gateway_listen:
            raise SettingsError(f"JOBSTREAM_GATEWAY_LISTEN must be host:port, got {self.gateway_listen!r}")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}jobstream-{name}"


def _parse(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"{name}: cannot read {raw!r} as {kind}") from None
    return raw
