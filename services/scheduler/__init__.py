"""The scheduler: the job state machine. It splits, dispatches, records, retries, merges and
publishes each job's sequenced events; it never runs job code."""
