"""Real Postgres and a Kafka-protocol broker as child processes, for `jobstream up` and the tests."""
