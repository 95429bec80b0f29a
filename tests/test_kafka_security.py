"""Kafka security settings reach every client the services make."""

from __future__ import annotations

import ssl

from jobstream.config import Settings
from jobstream.kafka import make_broadcast_consumer, make_group_consumer, make_producer, security


def test_plaintext_adds_nothing_but_the_protocol() -> None:
    assert security(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_over_tls_carries_the_mechanism_credentials_and_a_tls_context() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="jobstream",
        kafka_sasl_password="secret",
    )

    found = security(settings)

    assert isinstance(found.pop("ssl_context"), ssl.SSLContext)
    assert found == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "jobstream",
        "sasl_plain_password": "secret",
    }


async def test_every_client_is_made_with_the_settings_security() -> None:
    settings = Settings(kafka_security_protocol="SSL")
    producer = make_producer(settings)
    clients = [producer.client, make_group_consumer(settings, "g", ["t"])._client]
    clients.append(make_broadcast_consumer(settings)._client)

    for client in clients:
        assert client._security_protocol == "SSL"
        assert isinstance(client._ssl_context, ssl.SSLContext)
