"""The job-kind API, the registry and the built-in kinds, without any server."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

from jobstream.errors import ChunkError, InvalidArgument
from jobstream.kinds import (
    JSON,
    ChunkContext,
    JobKind,
    ParamSpec,
    RetryPolicy,
    get_kind,
    kind_names,
    load_kinds,
    register,
)
from jobstream.kinds import registry as registry_module
from jobstream.kinds.demo_sleep import CRASH_EXIT_CODE, DemoSleep
from jobstream.kinds.wordcount import WordCount, split_lines


@dataclass
class FakeContext:
    params: Mapping[str, Any]
    chunk_index: int = 0
    attempt: int = 1
    job_id: str = "job-1"
    cancelled: bool = False
    reports: list[tuple[float, str]] = field(default_factory=list)

    async def report(self, fraction: float, message: str = "") -> None:
        self.reports.append((fraction, message))


def context(kind: JobKind, params: Mapping[str, Any] | None = None, **fields: Any) -> FakeContext:
    return FakeContext(params=kind.params.validate(params or {}), **fields)


def _typed(ctx: FakeContext) -> ChunkContext:
    # Proves to mypy that the fake satisfies the protocol the worker implements.
    return ctx


class Nop(JobKind):
    name = "test.nop"
    params = ParamSpec()

    def split(self, params: Mapping[str, JSON], data: bytes) -> Iterator[bytes]:
        yield data

    async def run(self, ctx: ChunkContext, payload: bytes) -> JSON:
        return None

    def merge(self, params: Mapping[str, JSON], results: Iterable[JSON]) -> JSON:
        return {}


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_kinds", {})


# --- RetryPolicy ---------------------------------------------------------------------------------


def test_retry_delay_stays_within_the_exponential_ceiling_and_the_cap() -> None:
    policy = RetryPolicy(backoff_initial_s=1.0, backoff_max_s=10.0, backoff_multiplier=2.0)
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)]:
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
    assert 0.0 <= policy.delay(100_000) <= 10.0  # no overflow for absurd attempt numbers


def test_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().delay(0)
    bad: list[dict[str, Any]] = [
        {"max_attempts": 0},
        {"backoff_initial_s": -1},
        {"backoff_max_s": 0.5},
        {"backoff_multiplier": 0.5},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            RetryPolicy(**fields)


def test_should_retry_until_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.should_retry(a) for a in (1, 2, 3)] == [True, True, False]


# --- Registry ------------------------------------------------------------------------------------


def test_load_kinds_finds_the_builtin_entry_point_and_is_idempotent() -> None:
    load_kinds()
    load_kinds()
    assert {"demo.sleep", "text.wordcount"} <= set(kind_names())
    assert isinstance(get_kind("demo.sleep"), DemoSleep)
    assert isinstance(get_kind("text.wordcount"), WordCount)


def test_unknown_kind_is_invalid_argument_listing_known_kinds() -> None:
    load_kinds()
    with pytest.raises(InvalidArgument) as info:
        get_kind("demo.slep")
    assert info.value.field == "kind"
    assert str(info.value).startswith("unknown job kind 'demo.slep'; known kinds: ")
    assert "demo.sleep, " in str(info.value) and "text.wordcount" in str(info.value)


@pytest.mark.usefixtures("isolated_registry")
def test_register_works_as_class_decorator_and_tolerates_repeats() -> None:
    assert register(Nop) is Nop
    assert register(Nop) is Nop
    assert isinstance(get_kind("test.nop"), Nop)
    instance = get_kind("test.nop")
    assert register(instance) is instance
    assert kind_names() == ["test.nop"]


@pytest.mark.usefixtures("isolated_registry")
def test_registering_another_kind_under_a_taken_name_fails() -> None:
    register(Nop)
    with pytest.raises(ValueError, match="already registered"):
        register(Nop())

    class Impostor(Nop):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)


@pytest.mark.usefixtures("isolated_registry")
def test_register_refuses_non_kinds_and_bad_names() -> None:
    with pytest.raises(TypeError):
        register(object)  # type: ignore[type-var]

    class Spaced(Nop):
        name = "has space"

    with pytest.raises(ValueError, match="name"):
        register(Spaced)


@pytest.mark.usefixtures("isolated_registry")
def test_unknown_kind_message_when_nothing_is_loaded() -> None:
    with pytest.raises(InvalidArgument, match="known kinds: none"):
        get_kind("demo.sleep")


PLUGIN_SOURCE = """
from jobstream.kinds import JobKind, ParamSpec, register

class Base(JobKind):
    params = ParamSpec()
    def split(self, params, data):
        yield data
    async def run(self, ctx, payload):
        return None
    def merge(self, params, results):
        return {}

@register
class Mine(Base):
    name = "test.user"

class Unregistered(Base):
    name = "test.from_entry_point"
"""


@pytest.fixture
def plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A user's kind module on sys.path, under a name unique to the test so imports start fresh."""
    module = f"user_kinds_{request.node.name}"
    (tmp_path / f"{module}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return module


@pytest.mark.usefixtures("isolated_registry")
def test_load_kinds_imports_extra_modules(plugin_module: str) -> None:
    load_kinds([plugin_module])
    load_kinds([plugin_module])
    assert kind_names() == ["test.user"]


@pytest.mark.usefixtures("isolated_registry")
def test_entry_point_naming_a_class_registers_it(plugin_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="mine", value=f"{plugin_module}:Unregistered", group="jobstream.kinds")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [ep])
    load_kinds()
    assert kind_names() == ["test.from_entry_point", "test.user"]


@pytest.mark.usefixtures("isolated_registry")
def test_broken_plugins_stop_loading_with_their_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImportError, match="'no_such_module_xyz'"):
        load_kinds(["no_such_module_xyz"])
    ep = EntryPoint(name="broken", value="no_such_module_xyz", group="jobstream.kinds")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [ep])
    with pytest.raises(ImportError, match="entry point 'broken'"):
        load_kinds()


def test_builtin_kinds_have_valid_defaults_and_json_descriptions() -> None:
    load_kinds()
    for name in ("demo.sleep", "text.wordcount"):
        kind = get_kind(name)
        kind.params.validate({})
        json.dumps(kind.params.describe())


# --- demo.sleep ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ms", [0, 20])
async def test_demo_sleep_reports_at_least_twice_and_returns_its_index(ms: int) -> None:
    kind = DemoSleep()
    ctx = context(kind, {"ms": ms}, chunk_index=4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await kind.run(_typed(ctx), b"") == {"chunk": 4}
    assert loop.time() - started >= ms / 1000 * 0.9
    fractions = [f for f, _ in ctx.reports]
    assert len(fractions) >= 2 and 0.0 < fractions[0] < 1.0 and fractions[-1] == 1.0
    assert fractions == sorted(fractions)


def test_demo_sleep_splits_into_empty_payloads_and_counts_without_splitting() -> None:
    kind = DemoSleep()
    params = kind.params.validate({"chunks": 3.0})
    assert list(kind.split(params, b"")) == [b"", b"", b""]
    assert kind.count_chunks(kind.params.validate({"chunks": 100_000}), b"") == 100_000
    assert kind.merge(params, [{"chunk": 0}, {"chunk": 2}]) == {"chunks": 2}


async def test_fail_attempts_fails_the_first_attempts_then_succeeds() -> None:
    kind = DemoSleep()
    with pytest.raises(ChunkError, match="attempt 1 of chunk 2") as info:
        await kind.run(context(kind, {"ms": 0, "fail_attempts": 1}, chunk_index=2, attempt=1), b"")
    assert info.value.retryable
    ok = context(kind, {"ms": 0, "fail_attempts": 1}, chunk_index=2, attempt=2)
    assert await kind.run(ok, b"") == {"chunk": 2}


async def test_fail_chunks_fail_on_every_attempt_and_spare_the_others() -> None:
    kind = DemoSleep()
    params = {"ms": 0, "fail_chunks": " 3, 7,"}
    for attempt in (1, 2, 5):
        with pytest.raises(ChunkError, match="chunk 3 is in fail_chunks"):
            await kind.run(context(kind, params, chunk_index=3, attempt=attempt), b"")
    assert await kind.run(context(kind, params, chunk_index=4), b"") == {"chunk": 4}


def test_malformed_fail_chunks_is_refused_at_submit() -> None:
    kind = DemoSleep()
    with pytest.raises(InvalidArgument) as info:
        kind.validate_input(kind.params.validate({"fail_chunks": "3,x"}), b"")
    assert info.value.field == "params.fail_chunks" and "'x'" in str(info.value)


async def test_hang_chunk_hangs_until_cancelled() -> None:
    kind = DemoSleep()
    ctx = context(kind, {"ms": 0, "hang_chunk": 1}, chunk_index=1)
    task = asyncio.create_task(kind.run(ctx, b""))
    done, _ = await asyncio.wait([task], timeout=0.05)
    assert not done
    assert any("hanging" in message for _, message in ctx.reports)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    other = context(kind, {"ms": 0, "hang_chunk": 1}, chunk_index=0)
    assert await kind.run(other, b"") == {"chunk": 0}


class _Exited(BaseException):
    pass


async def test_crash_chunk_exits_the_process_on_the_chosen_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    kind = DemoSleep()
    params = {"ms": 0, "crash_chunk": 2, "crash_attempt": 2}
    assert await kind.run(context(kind, params, chunk_index=2, attempt=1), b"") == {"chunk": 2}
    with pytest.raises(_Exited):
        await kind.run(context(kind, params, chunk_index=2, attempt=2), b"")
    assert codes == [CRASH_EXIT_CODE] == [70]


# --- text.wordcount ------------------------------------------------------------------------------

WORDS = ["alpha", "Beta", "gamma_1", "Straße", "STRASSE", "naïve", "e\u0301t\u00e9", "日本語", "Ünïcödé", "x"]
SEPARATORS = [" ", "  ", ", ", "-", "\t", "'", "🙂", "…"]
LINE_BREAKS = ["\n", "\r\n", "\r", "\u2028", "\x0c", "\n\n"]


def reference(text: str, top: int) -> dict[str, Any]:
    counts = Counter(re.findall(r"\w+", text.casefold()))
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:top]
    return {
        "words": sum(counts.values()),
        "lines": len(text.splitlines()),
        "unique_words": len(counts),
        "top": [{"word": w, "count": c} for w, c in ranked],
    }


def tricky_text(rng: random.Random, size: int, long_line: int) -> str:
    """Random words and separators of every sort, lines of ``long_line`` characters, no final newline."""
    vocabulary = WORDS + [f"w{n}" for n in range(500)]
    count = size // 6
    words = rng.choices(vocabulary, k=count)
    seps = rng.choices(SEPARATORS + LINE_BREAKS, [8] * len(SEPARATORS) + [1] * len(LINE_BREAKS), k=count)
    body = "".join(w + s for w, s in zip(words, seps, strict=True))
    long = " ".join(rng.choices(vocabulary, k=long_line // 5))[:long_line]
    cuts = sorted(rng.sample(range(len(body)), 3))
    pieces = [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return f"\n{long}\n".join(pieces) + "\r\n" + long + " no trailing newline Straße"


async def run_job(kind: JobKind, raw_params: Mapping[str, Any], data: bytes) -> tuple[JSON, list[bytes]]:
    params = kind.params.validate(raw_params)
    kind.validate_input(params, data)
    payloads = list(kind.split(params, data))
    assert len(payloads) <= kind.count_chunks(params, data)
    results = []
    for index, payload in enumerate(payloads):
        ctx = FakeContext(params=params, chunk_index=index)
        # Results travel as JSON between worker and scheduler.
        results.append(json.loads(json.dumps(await kind.run(ctx, payload))))
    return kind.merge(params, results), payloads


async def test_wordcount_chunks_merge_to_the_same_result_as_one_pass_over_multi_mb_text() -> None:
    chunk_bytes = 16 * 1024
    text = tricky_text(random.Random(1), size=2 * 1024 * 1024, long_line=3 * chunk_bytes)
    data = text.encode()
    merged, payloads = await run_job(WordCount(), {"chunk_bytes": chunk_bytes, "top": 1000}, data)
    assert merged == reference(text, 1000)
    assert len(data) > 2 * 1024 * 1024 and len(payloads) > 100
    assert b"".join(payloads) == data
    assert any(len(p) > chunk_bytes for p in payloads)  # the long lines
    for payload in payloads:
        assert len(payload) <= chunk_bytes or payload.count(b"\n") <= 1
    assert all(p.endswith(b"\n") for p in payloads[:-1])


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 8, 13, 64])
async def test_split_lines_never_changes_counts_on_small_tricky_texts(chunk_bytes: int) -> None:
    texts = [
        "",
        "\n",
        "a",
        "a\r\nb\r\n\r\n",
        "Straße STRASSE\rstraße\n",
        "line without newline",
        "short\n" + "a-very-long-line-indeed " * 5 + "\nend",
        "é\u2028日本語\n\n\nx\x0cy\r",
    ]
    for text in texts:
        data = text.encode()
        payloads = list(split_lines(data, chunk_bytes))
        assert b"".join(payloads) == data
        assert sum(len(p.decode().splitlines()) for p in payloads) == len(text.splitlines())
        words = Counter(w for p in payloads for w in re.findall(r"\w+", p.decode().casefold()))
        assert words == Counter(re.findall(r"\w+", text.casefold()))
        assert len(payloads) <= (2 * (len(data) // chunk_bytes) + 1 if data else 0)


async def test_wordcount_top_is_ordered_by_count_then_word() -> None:
    text = "b a c b a d\nB e\n"
    merged, _ = await run_job(WordCount(), {"top": 3}, text.encode())
    assert merged == {
        "words": 8,
        "lines": 2,
        "unique_words": 5,
        "top": [{"word": "b", "count": 3}, {"word": "a", "count": 2}, {"word": "c", "count": 1}],
    }


async def test_empty_input_has_no_chunks_and_an_empty_result() -> None:
    merged, payloads = await run_job(WordCount(), {}, b"")
    assert payloads == []
    assert merged == {"words": 0, "lines": 0, "unique_words": 0, "top": []}


def test_wordcount_refuses_invalid_utf8_naming_the_byte_offset() -> None:
    kind = WordCount()
    with pytest.raises(InvalidArgument) as info:
        kind.validate_input(kind.params.validate({}), "héllo".encode() + b"\xff rest")
    assert info.value.field == "input"
    assert "byte offset 6" in str(info.value)


async def test_wordcount_chunk_that_is_not_utf8_fails_without_retry() -> None:
    kind = WordCount()
    with pytest.raises(ChunkError) as info:
        await kind.run(context(kind), b"ok\xc3")
    assert not info.value.retryable


def test_wordcount_chunk_bytes_is_bounded() -> None:
    with pytest.raises(InvalidArgument) as info:
        WordCount().params.validate({"chunk_bytes": 10})
    assert str(info.value) == "params.chunk_bytes: must be an integer between 1024 and 67108864, got 10"
