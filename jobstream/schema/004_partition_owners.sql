-- Fencing of schedulers. Each partition of the job-keyed topics has one owning scheduler at a
-- time (the consumer group decides); a scheduler that is given a partition raises its epoch here
-- before it writes anything for the partition's jobs, and every batch locks its jobs only where
-- the partition's epoch is still the one this scheduler raised it to (in the same statement, with
-- the owner row share-locked until commit). A scheduler that lost a partition while it was paused
-- or cut off therefore finds none of that partition's jobs: its late batch changes nothing. Raising
-- the epoch waits for a batch of the old owner that is already running to commit.
CREATE TABLE partition_owners (
    partition  smallint PRIMARY KEY,
    epoch      bigint NOT NULL,
    owner      text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
);

-- Superseded by partition_owners: ownership belongs to a partition, not to each job row.
ALTER TABLE jobs DROP COLUMN owner_epoch;
