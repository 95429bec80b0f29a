"""What the CLI prints and how it reads its arguments: pure functions, no server needed."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobstream.cli import client, render
from jobstream.cli.main import DEFAULT_GATEWAY, build_parser
from jobstream.events import to_struct
from jobstream.v1 import jobstream_pb2 as pb


def progress_event(percent: float, done: int, total: int, **fields: Any) -> pb.JobEvent:
    progress = pb.Progress(
        percent=percent,
        done_chunks=done,
        total_chunks=total,
        failed_chunks=fields.pop("failed", 0),
        eta_seconds=fields.pop("eta", 0.0),
    )
    return pb.JobEvent(type=pb.JOB_PROGRESS, state=pb.RUNNING, progress=progress, **fields)


# --- the live line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percent", "expected"),
    [(0, "[----------]"), (45, "[####------]"), (99.9, "[#########-]"), (100, "[##########]"), (250, "[##########]")],
)
def test_bar_fills_a_cell_only_once_its_share_is_done(percent: float, expected: str) -> None:
    assert render.bar(percent, 10) == expected


@pytest.mark.parametrize(("width", "cells"), [(20, 8), (40, 14), (60, 24), (200, 24)])
def test_bar_shrinks_on_narrow_terminals_and_stops_growing_on_wide_ones(width: int, cells: int) -> None:
    line = render.progress_line(progress_event(50, 2, 4), width)

    assert line.index("]") - 1 == cells


def test_progress_line_shows_counts_failures_eta_and_message() -> None:
    event = progress_event(45, 9, 20, failed=1, eta=12.4, message="chunk 9 done")

    line = render.progress_line(event, 120)

    assert line == "[##########--------------]  45.0% 9/20 chunks (1 failed) eta 12s  chunk 9 done"


def test_progress_line_keeps_the_last_message_when_the_event_has_none() -> None:
    line = render.progress_line(progress_event(10, 1, 10), 100, message="split into 10 chunks")

    assert line.endswith("  split into 10 chunks")


def test_progress_line_fits_the_terminal() -> None:
    event = pb.JobEvent(
        state=pb.RUNNING, progress=pb.Progress(total_chunks=4, done_chunks=2, percent=50), message="x" * 500
    )

    line = render.progress_line(event, width=60)

    assert len(line) == 59 and line.startswith("[############------------]  50.0% 2/4 chunks")


@pytest.mark.parametrize("width", [12, 40, 80, 81])
def test_progress_line_never_reaches_the_last_column(width: int) -> None:
    event = progress_event(50, 2, 4, eta=3, message="長い" * 100)

    line = render.progress_line(event, width)

    assert render.display_width(line) <= width - 1
    assert line.endswith("...")


def test_progress_line_turns_control_characters_into_spaces() -> None:
    line = render.progress_line(progress_event(1, 0, 1, message="a\nb\rc\x1b[2J"), 80)

    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("a b c [2J")


@pytest.mark.parametrize(
    ("text", "width", "expected"),
    [
        ("hello", 5, "hello"),
        ("hello world", 8, "hello..."),
        ("hello", 2, ".."),
        ("hello", 0, ""),
        ("日本語テキスト", 9, "日本語..."),
        ("日本語テキスト", 8, "日本..."),
    ],
)
def test_truncate_counts_terminal_columns_not_characters(text: str, width: int, expected: str) -> None:
    assert render.truncate(text, width) == expected


# --- plain event lines ------------------------------------------------------------------------


def test_event_line_is_stable_and_greppable() -> None:
    event = progress_event(45, 9, 20, seq=3, eta=1.25, message='half "way"')

    assert render.event_line(event) == 'seq=3 JOB_PROGRESS RUNNING 45.0% 9/20 eta 1.2s msg="half \\"way\\""'


def test_event_line_of_a_failed_chunk_names_it_and_quotes_the_error() -> None:
    event = pb.JobEvent(
        seq=7,
        type=pb.CHUNK_FAILED,
        state=pb.RUNNING,
        progress=pb.Progress(total_chunks=4, done_chunks=1, failed_chunks=1, percent=50),
        chunk_index=3,
        attempt=2,
        error="boom\non two lines",
    )

    assert render.event_line(event) == (
        'seq=7 CHUNK_FAILED RUNNING 50.0% 1/4 failed=1 chunk=3 attempt=2 error="boom\\non two lines"'
    )


def test_event_line_shows_values_from_a_newer_server_as_numbers() -> None:
    event = pb.JobEvent(seq=1, type=42, state=9)  # type: ignore[arg-type]

    assert render.event_line(event) == "seq=1 42 9 0.0% 0/0"


ETAS = [(0, "-"), (-1, "-"), (float("nan"), "-"), (0.04, "0.0s"), (3.14, "3.1s"), (9.94, "9.9s"), (12.4, "12s")]
ETAS += [(59.9, "59s"), (75, "1m15s"), (3599, "59m59s"), (3600, "1h00m"), (7300, "2h01m")]


@pytest.mark.parametrize(("seconds", "text"), ETAS)
def test_eta_reads_naturally(seconds: float, text: str) -> None:
    assert render.eta(seconds) == text


def test_outcome_of_a_success_ends_with_the_result_as_compact_json() -> None:
    event = pb.JobEvent(job_id="j1", state=pb.SUCCEEDED, result=to_struct({"words": 3, "top": [{"word": "a"}]}))

    assert render.outcome_line(event) == 'job j1 SUCCEEDED result={"top":[{"word":"a"}],"words":3}'


def test_outcome_of_a_failure_or_cancellation_says_why() -> None:
    failed = pb.JobEvent(job_id="j2", state=pb.FAILED, error='chunk 1: "x"')
    cancelled = pb.JobEvent(job_id="j3", state=pb.CANCELLED, message="user asked")

    assert render.outcome_line(failed) == 'job j2 FAILED error="chunk 1: \\"x\\""'
    assert render.outcome_line(cancelled) == 'job j3 CANCELLED reason="user asked"'


# --- the job table ----------------------------------------------------------------------------


def test_job_table_aligns_columns_and_keeps_the_given_order() -> None:
    newer = pb.Job(id="b-2", kind="text.wordcount", state=pb.RUNNING, progress=pb.Progress(percent=12.34))
    newer.created_at.FromSeconds(1_714_565_000)
    older = pb.Job(id="a-1", kind="demo.sleep", state=pb.SUCCEEDED, progress=pb.Progress(percent=100))

    assert render.job_table([newer, older]).splitlines() == [
        "ID   KIND            STATE      PERCENT  CREATED_AT",
        "b-2  text.wordcount  RUNNING    12.3%    2024-05-01T12:03:20Z",
        "a-1  demo.sleep      SUCCEEDED  100.0%   -",
    ]


def test_job_table_without_jobs_is_only_the_header() -> None:
    assert render.job_table([]) == "ID  KIND  STATE  PERCENT  CREATED_AT"


# --- reading params ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("chunks=20", ("chunks", 20)),
        ("ms=0.5", ("ms", 0.5)),
        ("name=abc", ("name", "abc")),
        ('name="20"', ("name", "20")),
        ("flag=true", ("flag", True)),
        ("x=[1,2]", ("x", [1, 2])),
        ("fail_chunks=3,7", ("fail_chunks", "3,7")),
        ("e=", ("e", "")),
        ("eq=a=b", ("eq", "a=b")),
        ("n=NaN", ("n", "NaN")),
    ],
)
def test_param_values_are_json_when_they_parse(text: str, expected: tuple[str, object]) -> None:
    assert render.parse_param(text) == expected


@pytest.mark.parametrize("text", ["oops", "=5"])
def test_param_without_key_or_equals_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        render.parse_param(text)


def test_single_params_override_the_json_object() -> None:
    merged = render.merge_params('{"chunks": 2, "ms": 10}', ["chunks=20", "name=x"])

    assert merged == {"chunks": 20, "ms": 10, "name": "x"}


@pytest.mark.parametrize(("text", "error"), [("[1]", "JSON object"), ("{chunks: 1}", "not valid JSON")])
def test_params_json_must_be_an_object(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        render.merge_params(text, [])


def test_submit_request_carries_params_input_and_key(tmp_path: Path) -> None:
    data = tmp_path / "in.txt"
    data.write_bytes(b"some words\n")
    args = build_parser().parse_args(
        ["submit", "text.wordcount", "--param", "top=3", "--input", str(data), "--idempotency-key", "k1"]
    )

    request = client.build_submit(args)

    assert (request.kind, request.input, request.idempotency_key) == ("text.wordcount", b"some words\n", "k1")
    assert request.params.fields["top"].number_value == 3


def test_unreadable_input_is_a_usage_error(tmp_path: Path) -> None:
    args = build_parser().parse_args(["submit", "text.wordcount", "--input", str(tmp_path / "missing")])

    with pytest.raises(client.UsageError, match="--input"):
        client.build_submit(args)


# --- the command line -------------------------------------------------------------------------


def test_connection_options_work_before_and_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBSTREAM_GATEWAY", raising=False)
    parser = build_parser()

    before = parser.parse_args(["--gateway", "h:1", "--timeout", "5", "get", "j"])
    after = parser.parse_args(["get", "j", "--gateway", "h:2"])
    neither = parser.parse_args(["get", "j"])

    assert (before.gateway, before.timeout) == ("h:1", 5.0)
    assert (after.gateway, after.timeout) == ("h:2", 30.0)
    assert neither.gateway == DEFAULT_GATEWAY


def test_gateway_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBSTREAM_GATEWAY", "gw:7")

    assert build_parser().parse_args(["list"]).gateway == "gw:7"


def test_usage_says_the_token_option_takes_the_key_itself() -> None:
    usage = build_parser().format_usage()

    assert "[--token KEY]" in usage and "[--ca FILE]" in usage


def test_list_state_is_case_insensitive_and_checked() -> None:
    parser = build_parser()

    assert parser.parse_args(["list", "--state", "running"]).state == pb.RUNNING
    with pytest.raises(SystemExit) as usage:
        parser.parse_args(["list", "--state", "sleeping"])
    assert usage.value.code == 2


def test_up_options_pass_through_to_up() -> None:
    args, extra = build_parser().parse_known_args(["up", "--workers", "3", "--ready-file", "f"])

    assert args.command == "up" and extra == ["--workers", "3", "--ready-file", "f"]


# --- showing a watch --------------------------------------------------------------------------


def test_plain_display_ends_with_the_outcome_line() -> None:
    out = io.StringIO()
    display = client.PlainDisplay(out)
    done = pb.JobEvent(job_id="j", seq=2, type=pb.JOB_SUCCEEDED, state=pb.SUCCEEDED, result=to_struct({"chunks": 1}))

    display.event(pb.JobEvent(job_id="j", seq=1, type=pb.JOB_QUEUED, state=pb.QUEUED))
    display.event(done)

    assert out.getvalue().splitlines() == [
        "seq=1 JOB_QUEUED QUEUED 0.0% 0/0",
        "seq=2 JOB_SUCCEEDED SUCCEEDED 0.0% 0/0",
        'job j SUCCEEDED result={"chunks":1}',
    ]


def test_live_display_redraws_one_line_and_scrolls_failures_above_it() -> None:
    out = io.StringIO()
    display = client.LiveDisplay(out)

    display.event(progress_event(25, 1, 4, message="working"))
    display.event(pb.JobEvent(type=pb.CHUNK_FAILED, chunk_index=2, attempt=1, error="boom"))
    display.close()

    text = out.getvalue()
    assert text.count("\n") == 2 and text.endswith("\n")
    assert "chunk 2 attempt 1 failed: boom\n" in text
    assert text.rstrip("\n").rsplit("\r\x1b[K", 1)[1].endswith("0/0 chunks  working")


# --- resuming a broken watch ------------------------------------------------------------------


class FlakyStub:
    """Breaks the first stream after two events, then serves the rest from where it is asked."""

    def __init__(self, events: list[pb.JobEvent]) -> None:
        self.events = events
        self.requests: list[int] = []

    def Watch(self, request: pb.WatchRequest) -> AsyncIterator[pb.JobEvent]:
        self.requests.append(request.after_seq)
        return self._stream(request.after_seq, broken=len(self.requests) == 1)

    async def _stream(self, after_seq: int, *, broken: bool) -> AsyncIterator[pb.JobEvent]:
        # Serves from one event earlier than asked, as a replay overlap would.
        for event in self.events[max(0, after_seq - 1) :]:
            if broken and event.seq == 3:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "socket closed", None
                )
            yield event


async def test_watch_resumes_after_the_last_seen_seq_without_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "FIRST_BACKOFF_SECONDS", 0.0)
    events = [pb.JobEvent(job_id="j", seq=seq, type=pb.JOB_PROGRESS) for seq in range(1, 5)]
    events.append(pb.JobEvent(job_id="j", seq=5, type=pb.JOB_SUCCEEDED, state=pb.SUCCEEDED))
    stub = FlakyStub(events)
    out = io.StringIO()

    final = await client.follow(stub, "j", client.PlainDisplay(out))  # type: ignore[arg-type]

    assert final.state == pb.SUCCEEDED and stub.requests == [0, 2]
    assert [line.split()[0] for line in out.getvalue().splitlines()[:5]] == [f"seq={n}" for n in range(1, 6)]
