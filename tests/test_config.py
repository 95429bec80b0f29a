from __future__ import annotations

import pytest

from jobstream.config import Settings, SettingsError


def test_reads_typed_values_from_the_environment() -> None:
    settings = Settings.from_env(
        {"JOBSTREAM_WORKER_CONCURRENCY": "4", "JOBSTREAM_LOG_JSON": "yes", "JOBSTREAM_KIND_MODULES": "a, b"}
    )

    assert settings.worker_concurrency == 4 and settings.log_json is True
    assert settings.kind_modules == ("a", "b")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"JOBSTREAM_WORKER_CONCURRENCY": "many"}, "JOBSTREAM_WORKER_CONCURRENCY"),
        ({"JOBSTREAM_WORKER_CONCURRENCY": "0"}, "JOBSTREAM_WORKER_CONCURRENCY"),
        ({"JOBSTREAM_LOG_JSON": "maybe"}, "JOBSTREAM_LOG_JSON"),
        ({"JOBSTREAM_HEARTBEAT_SECONDS": "20"}, "JOBSTREAM_HEARTBEAT_SECONDS"),
        ({"JOBSTREAM_GATEWAY_LISTEN": "nowhere"}, "JOBSTREAM_GATEWAY_LISTEN"),
        ({"JOBSTREAM_GATEWAY_TLS_CERT": "server.crt"}, "JOBSTREAM_GATEWAY_TLS_KEY"),
        ({"JOBSTREAM_GATEWAY_TLS_CLIENT_CA": "ca.crt"}, "JOBSTREAM_GATEWAY_TLS_CERT"),
        ({"JOBSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "JOBSTREAM_KAFKA_SECURITY_PROTOCOL"),
        ({"JOBSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"}, "JOBSTREAM_KAFKA_SASL_MECHANISM"),
    ],
)
def test_malformed_value_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_prefix_applies_to_topics_and_groups() -> None:
    settings = Settings(topic_prefix="t1.")

    assert settings.topic("jobs.chunks") == "t1.jobs.chunks"
    assert settings.group("workers") == "t1.jobstream-workers"
