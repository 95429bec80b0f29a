"""``text.wordcount``: words, lines and the most frequent words of a UTF-8 text.

Definitions (the merged job result equals one pass over the whole text with these):

* a *word* is a maximal run of Unicode word characters, ``re.findall(r"\\w+", text.casefold())``:
  letters, digits and underscore in any script, compared after case folding (so "Straße" and "STRASSE"
  are the same word);
* *lines* is ``len(text.splitlines())``: every line break Python knows (``\\n``, ``\\r\\n``, ``\\r``,
  ``\\u2028``, ...) ends a line, and text after the last break counts as one more line.

Chunks are cut only right after a ``\\n`` byte. That byte never occurs inside a multi-byte UTF-8
sequence, is not a word character, and ends any ``\\r\\n`` pair it belongs to, so no cut splits a
character, a word or a line break, and per-chunk word and line counts add up to the totals.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

from jobstream.errors import ChunkError, InvalidArgument
from jobstream.kinds.api import JSON, ChunkContext, JobKind
from jobstream.kinds.params import Param, ParamSpec

_WORD = re.compile(r"\w+")
_MIB = 1024 * 1024


class WordCount(JobKind):
    name = "text.wordcount"
    params = ParamSpec(
        Param(
            "chunk_bytes",
            int,
            default=_MIB,
            min=1024,
            max=64 * _MIB,
            doc="target chunk size; chunks hold whole lines, a longer line is a chunk of its own",
        ),
        Param("top", int, default=20, min=1, max=1000, doc="how many of the most frequent words to return"),
    )

    def validate_input(self, params: Mapping[str, JSON], data: bytes) -> None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"input: not valid UTF-8 at byte offset {exc.start} ({exc.reason})", field="input"
            ) from None

    def count_chunks(self, params: Mapping[str, JSON], data: bytes) -> int:
        """An upper bound, not the exact count: ``2 * (len(data) // chunk_bytes) + 1``.

        It holds because any two consecutive chunks together exceed ``chunk_bytes`` (a chunk ends
        early only when the next line would not fit, and an over-long line exceeds it alone).
        """
        if not data:
            return 0
        return 2 * (len(data) // int(params["chunk_bytes"])) + 1

    def split(self, params: Mapping[str, JSON], data: bytes) -> Iterator[bytes]:
        yield from split_lines(data, int(params["chunk_bytes"]))

    async def run(self, ctx: ChunkContext, payload: bytes) -> JSON:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Input is validated at Submit, so this means the payload was damaged on the way:
            # running it again would fail the same way.
            raise ChunkError(f"chunk is not valid UTF-8 at byte offset {exc.start}", retryable=False) from None
        words = _WORD.findall(text.casefold())
        counts = Counter(words)
        await ctx.report(1.0)
        return {"words": len(words), "lines": len(text.splitlines()), "counts": dict(counts)}

    def merge(self, params: Mapping[str, JSON], results: Iterable[JSON]) -> JSON:
        words = lines = 0
        counts: Counter[str] = Counter()
        for result in results:
            words += int(result["words"])
            lines += int(result["lines"])
            counts.update(result["counts"])
        top = heapq.nsmallest(int(params["top"]), counts.items(), key=lambda wc: (-wc[1], wc[0]))
        return {
            "words": words,
            "lines": lines,
            "unique_words": len(counts),
            "top": [{"word": w, "count": c} for w, c in top],
        }


def split_lines(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Cuts ``data`` after ``\\n`` bytes into runs of whole lines of at most ``chunk_bytes`` each.

    A single line longer than ``chunk_bytes`` becomes a chunk of its own; empty data gives no chunks.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    start, size = 0, len(data)
    while start < size:
        end = start + chunk_bytes
        if end >= size:
            yield data[start:]
            return
        cut = data.rfind(b"\n", start, end)
        if cut < 0:
            # The line starting here does not fit: it goes alone, up to and including its "\n".
            cut = data.find(b"\n", end)
            if cut < 0:
                yield data[start:]
                return
        yield data[start : cut + 1]
        start = cut + 1
