"""The token format and the authorization metadata, without a database."""

from __future__ import annotations

import pytest

from jobstream.api_keys import bearer_token, check_tenant_id, parse_token
from jobstream.errors import InvalidArgument, Unauthenticated

KEY = "jsk_0123456789abcdef_c2VjcmV0-_x"


def test_a_well_formed_token_splits_into_key_id_and_secret() -> None:
    assert parse_token(KEY) == ("0123456789abcdef", "c2VjcmV0-_x")


@pytest.mark.parametrize(
    "token",
    ["", "jsk_", "jsk_0123456789abcdef", "jsk_0123456789abcdef_", "jsk_0123456789ABCDEF_s", "xyz_0123456789abcdef_s",
     "jsk_0123456789abcde_xs", "jsk_0123456789abcdef-secret"],
)  # fmt: skip
def test_malformed_tokens_are_unauthenticated_with_the_expected_shape_named(token: str) -> None:
    with pytest.raises(Unauthenticated, match="malformed"):
        parse_token(token)


def test_the_bearer_token_is_read_from_the_authorization_metadata() -> None:
    assert bearer_token((("x-other", "1"), ("authorization", f"Bearer {KEY}"))) == KEY
    assert bearer_token((("authorization", f"bearer   {KEY} "),)) == KEY


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "no API key"),
        (None, "no API key"),
        ((("authorization", KEY),), "Bearer"),
        ((("authorization", f"Basic {KEY}"),), "Bearer"),
        ((("authorization", "Bearer "),), "Bearer"),
    ],
)
def test_missing_or_other_authorization_is_unauthenticated(metadata: object, says: str) -> None:
    with pytest.raises(Unauthenticated, match=says):
        bearer_token(metadata)


@pytest.mark.parametrize("tenant", ["a", "acme", "acme-2", "0a", "a" * 63])
def test_tenant_ids_that_are_accepted(tenant: str) -> None:
    check_tenant_id(tenant)


@pytest.mark.parametrize("tenant", ["", "-a", "a-", "Acme", "a b", "a_b", "a" * 64, "é", "acme\n"])
def test_tenant_ids_that_are_refused(tenant: str) -> None:
    with pytest.raises(InvalidArgument, match="tenant id"):
        check_tenant_id(tenant)
