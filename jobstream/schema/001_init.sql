-- jobstream schema. Postgres is the source of truth: anything on Kafka can be rebuilt from it.
-- Job states use the numbers of jobstream.v1.JobState; chunk states are listed in jobstream/states.py.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Every job belongs to a tenant from the first line; until API keys exist everything is "default".
INSERT INTO tenants (id, name) VALUES ('default', 'default');

CREATE TABLE jobs (
    id                   uuid PRIMARY KEY,
    tenant_id            text NOT NULL REFERENCES tenants (id),
    -- The partition of the job-keyed topics that carries this job: its owning scheduler finds
    -- the jobs it must reconcile by this number.
    partition            smallint NOT NULL,
    kind                 text NOT NULL,
    params               jsonb NOT NULL,
    -- Per-job overrides of the kind's retry policy and chunk timeout (jobstream.v1.JobOptions).
    options              jsonb NOT NULL DEFAULT '{}',
    idempotency_key      text,
    -- Hash of (kind, params, input): the same idempotency key with another request is refused.
    request_hash         bytea NOT NULL,
    state                smallint NOT NULL,
    total_chunks         integer NOT NULL DEFAULT 0,
    done_chunks          integer NOT NULL DEFAULT 0,
    failed_chunks        integer NOT NULL DEFAULT 0,
    progress_message     text NOT NULL DEFAULT '',
    result               jsonb,
    error                text NOT NULL DEFAULT '',
    -- The seq of the newest row in job_events; the next event gets last_seq + 1.
    last_seq             bigint NOT NULL DEFAULT 0,
    -- Fencing token of the scheduler that owns the job; a write from an older owner is refused.
    owner_epoch          bigint NOT NULL DEFAULT 0,
    cancel_requested_at  timestamptz,
    cancel_reason        text NOT NULL DEFAULT '',
    deadline_at          timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant_newest ON jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX jobs_unfinished ON jobs (partition, state) WHERE state IN (1, 2);
CREATE INDEX jobs_deadlines ON jobs (deadline_at) WHERE deadline_at IS NOT NULL AND state IN (1, 2);

-- Kept apart from jobs so listing and watching never read the (up to MiBs of) input.
CREATE TABLE job_inputs (
    job_id  uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data    bytea NOT NULL
);

CREATE TABLE chunks (
    job_id            uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx               integer NOT NULL,
    state             smallint NOT NULL DEFAULT 0,
    -- The attempt currently dispatched (1-based); a worker may claim only that attempt. It grows on
    -- every new dispatch (failure, lost worker, release), while `failures` alone counts against the
    -- retry policy: losing a worker is not the chunk's fault.
    attempt           integer NOT NULL DEFAULT 1,
    failures          integer NOT NULL DEFAULT 0,
    -- How many times a worker claimed (started) this chunk: > 1 means it ran more than once.
    claims            integer NOT NULL DEFAULT 0,
    payload           bytea NOT NULL,
    worker_id         text,
    claimed_at        timestamptz,
    lease_expires_at  timestamptz,
    -- Retry backoff: the attempt is not dispatched before this time.
    not_before        timestamptz,
    finished_at       timestamptz,
    result            jsonb,
    error             text,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX chunks_running_leases ON chunks (lease_expires_at) WHERE state = 1;

-- The ordered event log Watch replays; event is a serialized jobstream.v1.JobEvent.
CREATE TABLE job_events (
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    event       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);

-- Messages written in the same transaction as the state they announce; a relay publishes them,
-- so an acknowledged Submit or Cancel reaches Kafka even if the broker was down at the time.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    key         bytea,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Each time a scheduler finds the broker came back empty (the marker topic is gone) it recreates
-- the topics and adds a row here; every scheduler that sees a new row re-dispatches its jobs.
CREATE TABLE broker_epochs (
    id           bigserial PRIMARY KEY,
    detected_at  timestamptz NOT NULL DEFAULT now(),
    detected_by  text NOT NULL
);
