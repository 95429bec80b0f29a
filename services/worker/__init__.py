"""The worker: claims chunks, runs the job kind's code, heartbeats, reports; never decides job state."""
