"""ParamSpec: what clients may send as job params and what they are told when it is wrong."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from jobstream.errors import InvalidArgument
from jobstream.kinds.params import Param, ParamSpec

SPEC = ParamSpec(
    Param("chunks", int, default=10, min=1, max=100_000, doc="number of chunks"),
    Param("ratio", float, default=0.5, min=0.0, max=1.0),
    Param("label", str, default=""),
    Param("verbose", bool, default=False),
    Param("mode", str, default="fast", choices=["fast", "slow"]),
    Param("limit", int, min=0),
)


def refused(raw: Any, spec: ParamSpec = SPEC) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        spec.validate(raw)
    return info.value


def test_omitted_params_get_their_defaults_and_undefaulted_ones_are_none() -> None:
    assert SPEC.validate({}) == {
        "chunks": 10,
        "ratio": 0.5,
        "label": "",
        "verbose": False,
        "mode": "fast",
        "limit": None,
    }


def test_bad_value_message_names_the_field_the_bounds_and_the_value() -> None:
    err = refused({"chunks": "abc"})
    assert str(err) == 'params.chunks: must be an integer between 1 and 100000, got "abc"'
    assert err.field == "params.chunks"


def test_struct_floats_with_integral_values_are_accepted_as_ints() -> None:
    params = SPEC.validate({"chunks": 3.0, "limit": 0.0})
    assert params["chunks"] == 3 and type(params["chunks"]) is int
    assert type(params["limit"]) is int


@pytest.mark.parametrize("value", [3.5, True, False, math.nan, math.inf, -math.inf, "3", [3], {"n": 3}])
def test_int_param_refuses_fractions_bools_non_finite_and_non_numbers(value: Any) -> None:
    err = refused({"chunks": value})
    assert err.field == "params.chunks"
    assert err.message.startswith("params.chunks: must be an integer between 1 and 100000, got ")


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1, 1.0), (0.25, 0.25)])
def test_float_param_accepts_ints_and_floats_as_float(value: Any, expected: float) -> None:
    result = SPEC.validate({"ratio": value})["ratio"]
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [1.5, -0.1, math.nan, True, "0.5"])
def test_float_param_refuses_out_of_bounds_nan_bools_and_strings(value: Any) -> None:
    assert refused({"ratio": value}).field == "params.ratio"


def test_bounds_are_inclusive() -> None:
    assert SPEC.validate({"chunks": 1})["chunks"] == 1
    assert SPEC.validate({"chunks": 100_000.0})["chunks"] == 100_000
    assert "got 0" in refused({"chunks": 0}).message
    assert "got 100001" in refused({"chunks": 100_001}).message


def test_one_sided_bounds_are_described_in_words() -> None:
    assert str(refused({"limit": -1})) == "params.limit: must be an integer of at least 0, got -1"
    spec = ParamSpec(Param("n", int, max=5))
    assert str(refused({"n": 6}, spec)) == "params.n: must be an integer of at most 5, got 6"


def test_bool_param_accepts_only_true_or_false() -> None:
    assert SPEC.validate({"verbose": True})["verbose"] is True
    assert str(refused({"verbose": 1.0})) == "params.verbose: must be true or false, got 1.0"


def test_str_param_refuses_numbers() -> None:
    assert str(refused({"label": 1.0})) == "params.label: must be a string, got 1.0"


def test_choices_are_listed_when_refused() -> None:
    assert SPEC.validate({"mode": "slow"})["mode"] == "slow"
    assert str(refused({"mode": "medium"})) == ('params.mode: must be a string, one of "fast", "slow", got "medium"')


def test_a_single_unknown_param_is_named_with_the_known_ones() -> None:
    err = refused({"chunk": 5})
    assert err.field == "params.chunk"
    assert str(err) == "params.chunk: unknown param; known params: chunks, ratio, label, verbose, mode, limit"


def test_several_unknown_params_are_all_named() -> None:
    err = refused({"zeta": 1, "alpha": 2, "chunks": 3})
    assert err.field == "params"
    assert err.message.startswith('params: unknown params "alpha", "zeta"; known params: chunks')


def test_kind_without_params_says_so() -> None:
    assert "this kind takes no params" in str(refused({"x": 1}, ParamSpec()))


def test_required_param_missing_or_null_is_refused() -> None:
    spec = ParamSpec(Param("url", str, required=True))
    for raw in ({}, {"url": None}):
        err = refused(raw, spec)
        assert err.field == "params.url"
        assert str(err) == "params.url: required, must be a string"
    assert spec.validate({"url": "x"}) == {"url": "x"}


def test_null_counts_as_omitted() -> None:
    assert SPEC.validate({"chunks": None})["chunks"] == 10


def test_params_that_are_not_an_object_are_refused() -> None:
    err = refused([1, 2])
    assert err.field == "params"
    assert str(err) == "params: must be an object, got [1, 2]"
    assert SPEC.validate(None)["chunks"] == 10


def test_long_values_are_shortened_in_messages() -> None:
    message = str(refused({"chunks": "x" * 10_000}))
    assert len(message) < 200 and message.endswith("...")


def test_defaults_are_stored_in_the_declared_type() -> None:
    param = Param("ratio", float, default=1)
    assert param.default == 1.0 and type(param.default) is float


@pytest.mark.parametrize(
    "make",
    [
        lambda: Param("n", int, default=0, min=1),
        lambda: Param("n", int, default=1.5),
        lambda: Param("n", int, default=True),
        lambda: Param("n", int, min=5, max=1),
        lambda: Param("n", int, required=True, default=1),
        lambda: Param("s", str, min=1),
        lambda: Param("b", bool, choices=[True]),
        lambda: Param("m", str, choices=["a", 1]),
        lambda: Param("", int),
        lambda: Param("l", list),  # type: ignore[arg-type]
        lambda: ParamSpec(Param("n", int), Param("n", str)),
    ],
)
def test_inconsistent_specs_fail_when_declared(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_describe_lists_every_param_as_json_in_declaration_order() -> None:
    described = SPEC.describe()
    assert [d["name"] for d in described] == SPEC.names
    assert described[0] == {
        "name": "chunks",
        "type": "int",
        "required": False,
        "default": 10,
        "min": 1,
        "max": 100_000,
        "choices": None,
        "doc": "number of chunks",
        "expects": "an integer between 1 and 100000",
    }
    assert described[4]["choices"] == ["fast", "slow"]
    json.dumps(described)
